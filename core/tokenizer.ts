// Text ⇄ token ids for a Hugging Face model directory, through npm @huggingface/tokenizers.
// A directory with `tokenizer.json` is loaded as is; one with only the slow-tokenizer files of
// a byte-level BPE model (`vocab.json`, `merges.txt`, `tokenizer_config.json`, as Qwen2 ships
// them) gets the equivalent tokenizer.json built here. End-of-sequence and padding ids come
// from `generation_config.json`, else `tokenizer_config.json`; the chat template rides along.

import { Tokenizer } from "@huggingface/tokenizers";
import { AhaError } from "./errors.ts";
import { ChatTemplate } from "./chat_template.ts";

export interface TextTokenizer {
  /** Token ids of `text`; special tokens written in the text (e.g. `<|im_end|>`) become their ids. */
  encode(text: string): number[];
  /** The text of `ids`; ids past the vocabulary (padding rows of the embedding) decode to "". */
  decode(ids: number[], skipSpecialTokens?: boolean): string;
  /** A decoder fed one id at a time that never emits half a UTF-8 character. */
  streamDecoder(): StreamDecoder;
  tokenToId(token: string): number | undefined;
  /** Number of token ids the tokenizer knows (the model's embedding may have more rows). */
  vocabSize: number;
  /** Ids that end a completion, most specific first. */
  eosIds: number[];
  padId: number | null;
  chatTemplate: ChatTemplate | null;
}

export interface StreamDecoder {
  /** Text that became complete with this id (often "", while a character is still partial). */
  push(id: number): string;
  /** Whatever is left at the end, incomplete bytes shown as U+FFFD. */
  flush(): string;
}

type Json = Record<string, unknown>;

// Qwen2's pre-tokenizer split (as in its tokenizer.json): contractions, letter runs with one
// leading non-letter, single digits, punctuation runs, newlines, then other whitespace.
const QWEN2_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/** Load the tokenizer of the Hugging Face model directory `dir`. */
export async function loadTokenizer(dir: string): Promise<TextTokenizer> {
  const config = await readJson(`${dir}/tokenizer_config.json`) ?? {};
  const generation = await readJson(`${dir}/generation_config.json`) ?? {};
  const tokenizerJson = await readJson(`${dir}/tokenizer.json`) ??
    await buildByteLevelBpe(dir, config);
  tokenizerJson.post_processor ??= null; // the library requires the key
  let tokenizer: Tokenizer;
  try {
    tokenizer = new Tokenizer(tokenizerJson, config);
  } catch (e) {
    throw new AhaError(`${dir}: cannot build the tokenizer: ${(e as Error).message}`);
  }
  let vocabSize = 0;
  for (const id of tokenizer.get_vocab(true).values()) vocabSize = Math.max(vocabSize, id + 1);
  const tokenId = (field: unknown): number | undefined => {
    const content = typeof field === "object" && field !== null ? (field as Json).content : field;
    return typeof content === "string" ? tokenizer.token_to_id(content) : undefined;
  };
  const eosIds = [...idList(generation.eos_token_id), tokenId(config.eos_token)]
    .filter((id, i, all): id is number => id !== undefined && all.indexOf(id) === i);
  const pad = idList(generation.pad_token_id)[0] ?? tokenId(config.pad_token);
  const decode = (ids: number[], skipSpecialTokens = false) => {
    const known = ids.filter((id) => id >= 0 && id < vocabSize);
    if (known.length === 0) return "";
    return tokenizer.decode(known, { skip_special_tokens: skipSpecialTokens });
  };
  const encode = (text: string) =>
    text === "" ? [] : tokenizer.encode(text, { add_special_tokens: false }).ids;
  return {
    encode,
    decode,
    streamDecoder: () => new IncrementalDecoder(decode),
    tokenToId: (token) => tokenizer.token_to_id(token),
    vocabSize,
    eosIds,
    padId: pad ?? null,
    chatTemplate: await ChatTemplate.load(dir, config),
  };
}

function idList(value: unknown): number[] {
  if (typeof value === "number") return [value];
  return Array.isArray(value) ? value.filter((v) => typeof v === "number") : [];
}

/** The tokenizer.json object equivalent to Qwen2's slow-tokenizer files (byte-level BPE). */
async function buildByteLevelBpe(dir: string, config: Json): Promise<Json> {
  const kind = config.tokenizer_class ?? "Qwen2Tokenizer";
  if (kind !== "Qwen2Tokenizer" && kind !== "Qwen2TokenizerFast") {
    throw new AhaError(
      `${dir}: no tokenizer.json, and building one from vocab.json + merges.txt is only done ` +
        `for Qwen2Tokenizer (tokenizer_config.json says ${JSON.stringify(kind)})`,
    );
  }
  const vocab = await readJson(`${dir}/vocab.json`);
  const mergesText = await Deno.readTextFile(`${dir}/merges.txt`).catch(() => null);
  if (vocab === null || mergesText === null) {
    throw new AhaError(
      `${dir}: no tokenizer.json, and no vocab.json + merges.txt to build one from`,
    );
  }
  const merges: string[][] = [];
  mergesText.split("\n").forEach((line, i) => {
    if (line === "" || (i === 0 && line.startsWith("#version"))) return;
    const pair = line.split(" ");
    if (pair.length !== 2) throw new AhaError(`${dir}/merges.txt: line ${i + 1}: expected "a b"`);
    merges.push(pair);
  });
  const added = Object.entries((config.added_tokens_decoder ?? {}) as Record<string, Json>)
    .map(([id, token]) => ({
      id: Number(id),
      content: token.content,
      single_word: token.single_word ?? false,
      lstrip: token.lstrip ?? false,
      rstrip: token.rstrip ?? false,
      normalized: token.normalized ?? false,
      special: token.special ?? false,
    }));
  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: false };
  return {
    version: "1.0",
    added_tokens: added,
    normalizer: { type: "NFC" },
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: QWEN2_SPLIT }, behavior: "Isolated", invert: false },
        { ...byteLevel, use_regex: false },
      ],
    },
    post_processor: null,
    decoder: { ...byteLevel, use_regex: false },
    model: {
      type: "BPE",
      unk_token: null,
      continuing_subword_prefix: "",
      end_of_word_suffix: "",
      fuse_unk: false,
      byte_fallback: false,
      vocab,
      merges,
    },
  };
}

/**
 * Streaming decode in the manner of text-generation-inference: re-decode the ids since the last
 * emitted boundary and emit only the new suffix, holding back while it ends in an incomplete
 * character (U+FFFD). Works for any decoder, including ones that drop a leading space.
 */
class IncrementalDecoder implements StreamDecoder {
  private ids: number[] = [];
  private prefix = 0; // ids[prefix, read) decode to text already emitted
  private read = 0;

  constructor(private decode: (ids: number[]) => string) {}

  push(id: number): string {
    this.ids.push(id);
    const before = this.decode(this.ids.slice(this.prefix, this.read));
    const after = this.decode(this.ids.slice(this.prefix));
    if (after.length <= before.length || after.endsWith("\uFFFD")) return "";
    this.prefix = this.read;
    this.read = this.ids.length;
    return after.slice(before.length);
  }

  flush(): string {
    const before = this.decode(this.ids.slice(this.prefix, this.read));
    const rest = this.decode(this.ids.slice(this.prefix)).slice(before.length);
    this.prefix = this.read = this.ids.length;
    return rest;
  }
}

/** The JSON object in `path`, or null when there is no such file. */
async function readJson(path: string): Promise<Json | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new AhaError(`${path}: cannot read: ${(e as Error).message}`);
  }
  try {
    const json = JSON.parse(text);
    if (typeof json !== "object" || json === null || Array.isArray(json)) throw new Error();
    return json;
  } catch {
    throw new AhaError(`${path}: expected a JSON object`);
  }
}
