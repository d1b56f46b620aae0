// The Qwen2.5 tokenizer built from its slow-tokenizer files (tests/fixtures/qwen2-tokenizer):
// ids known from the official tokenizer, agreement with a plain byte-level BPE written here from
// the published algorithm, round trips, streaming decode, and the chat template byte for byte.

import assert from "node:assert/strict";
import { loadTokenizer } from "../core/tokenizer.ts";

const QWEN = new URL("./fixtures/qwen2-tokenizer", import.meta.url).pathname;
const tokenizer = await loadTokenizer(QWEN);

Deno.test("known ids of the official Qwen2.5 tokenizer", () => {
  assert.deepEqual(tokenizer.encode("Hello"), [9707]);
  assert.deepEqual(tokenizer.encode("Hello, world!"), [9707, 11, 1879, 0]);
  assert.deepEqual(tokenizer.encode("<|im_start|>"), [151644]);
  assert.deepEqual(tokenizer.encode(" the"), [279]);
  assert.deepEqual(tokenizer.encode("a<|im_end|>"), [64, 151645]);
  assert.equal(tokenizer.tokenToId("<|endoftext|>"), 151643);
  assert.equal(tokenizer.vocabSize, 151665);
  assert.deepEqual(tokenizer.eosIds, [151645, 151643]); // generation_config.json
  assert.equal(tokenizer.padId, 151643);
  assert.deepEqual(tokenizer.encode(""), []);
});

const MIXED = [
  "Natalia sold 48/2 = 24 clips in May; 1,234,567.89 in total.",
  "深度学习模型的训练需要大量的数据。你好，世界！",
  "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))\r\n",
  "   leading and trailing   \n\n\n  ",
  "mixed: café naïve 日本語 123abc ABC's they'll I'M 🤔🦜🦚 龘𝔘 \u00a0nbsp",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
];

Deno.test("decode(encode(x)) = x on mixed text", () => {
  for (const text of MIXED) assert.equal(tokenizer.decode(tokenizer.encode(text)), text);
});

// An independent byte-level BPE: GPT-2's byte→character table, Qwen2's split as a JS regex,
// and the textbook merge loop (merge the adjacent pair of lowest rank until none is left).
const vocab: Record<string, number> = JSON.parse(await Deno.readTextFile(`${QWEN}/vocab.json`));
const ranks = new Map(
  (await Deno.readTextFile(`${QWEN}/merges.txt`)).split("\n").filter((l) => l).map((
    l,
    i,
  ) => [l, i]),
);
const byteChar: string[] = [];
{
  const printable = (b: number) =>
    (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    byteChar[b] = String.fromCodePoint(printable(b) ? b : 256 + extra++);
  }
}
const SPLIT =
  /'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+/gu;

function twinEncode(text: string): number[] {
  const ids: number[] = [];
  for (const [piece] of text.normalize("NFC").matchAll(SPLIT)) {
    let parts = [...new TextEncoder().encode(piece)].map((b) => byteChar[b]);
    while (parts.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i + 1 < parts.length; i++) {
        const rank = ranks.get(`${parts[i]} ${parts[i + 1]}`) ?? Infinity;
        if (rank < bestRank) [best, bestRank] = [i, rank];
      }
      if (best < 0) break;
      parts = [...parts.slice(0, best), parts[best] + parts[best + 1], ...parts.slice(best + 2)];
    }
    ids.push(...parts.map((p) => vocab[p]));
  }
  return ids;
}

Deno.test("encode agrees with a plain byte-level BPE on GSM8K questions and mixed text", async () => {
  const gsm8k = (await Deno.readTextFile(
    new URL("../data/gsm8k/test.jsonl", import.meta.url),
  )).split("\n").slice(0, 150).filter((l) => l).map((l) => JSON.parse(l));
  const texts = [...MIXED.slice(0, 5), ...gsm8k.flatMap((r) => [r.question, r.answer])];
  for (const text of texts) assert.deepEqual(tokenizer.encode(text), twinEncode(text), text);
});

Deno.test("streaming decode never emits half a character", () => {
  const text = "龘 is rare, 𝔘 too; 🫠 melts. 𓀀!";
  const ids = tokenizer.encode(text);
  const partial = ids.filter((id) => tokenizer.decode([id]).includes("\uFFFD"));
  assert.ok(partial.length >= 4, "several characters span more than one token");
  const stream = tokenizer.streamDecoder();
  const pieces = ids.map((id) => stream.push(id));
  pieces.push(stream.flush());
  assert.equal(pieces.join(""), text);
  for (const piece of pieces) assert.ok(!piece.includes("\uFFFD"), JSON.stringify(piece));
  assert.ok(pieces.includes(""), "bytes of a split character are held back");
  // A stream cut mid-character shows the incomplete bytes as U+FFFD only at flush.
  const cut = tokenizer.streamDecoder();
  const [first] = tokenizer.encode("龘");
  assert.equal(cut.push(first), "");
  assert.equal(cut.flush(), "\uFFFD");
});

Deno.test("decode skips special tokens on request and ids past the vocabulary", () => {
  const ids = [...tokenizer.encode("Hi"), 151645, 151935];
  assert.equal(tokenizer.decode(ids), "Hi<|im_end|>");
  assert.equal(tokenizer.decode(ids, true), "Hi");
  assert.equal(tokenizer.decode([]), "");
});

Deno.test("chat prompt is exactly Qwen's format", () => {
  const chat = tokenizer.chatTemplate!;
  const system = "You are a helpful assistant.\nThink first.";
  const user = "Janet has 3 apples.\nHow many?";
  assert.equal(
    chat.prompt(user, system),
    `<|im_start|>system\n${system}<|im_end|>\n<|im_start|>user\n${user}<|im_end|>\n` +
      "<|im_start|>assistant\n",
  );
  // Without a system message, Qwen2.5's template supplies its own.
  assert.equal(
    chat.prompt(user),
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant." +
      `<|im_end|>\n<|im_start|>user\n${user}<|im_end|>\n<|im_start|>assistant\n`,
  );
  assert.equal(
    chat.render([{ role: "user", content: "hi" }], false),
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant." +
      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
  );
});

Deno.test("a directory with tokenizer.json loads it as is", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // No post_processor key, eos only in tokenizer_config.json (as an AddedToken object).
    await Deno.writeTextFile(
      `${dir}/tokenizer.json`,
      JSON.stringify({
        added_tokens: [{ id: 3, content: "<eos>", special: true, normalized: false }],
        normalizer: null,
        pre_tokenizer: { type: "Whitespace" },
        decoder: { type: "Fuse" },
        model: { type: "BPE", vocab: { a: 0, b: 1, ab: 2 }, merges: ["a b"] },
      }),
    );
    await Deno.writeTextFile(
      `${dir}/tokenizer_config.json`,
      JSON.stringify({
        eos_token: { content: "<eos>" },
        chat_template: "{{ messages[0].content }}!",
      }),
    );
    const tiny = await loadTokenizer(dir);
    assert.deepEqual(tiny.encode("abab<eos>"), [2, 2, 3]);
    assert.equal(tiny.decode([2, 0]), "aba");
    assert.deepEqual(tiny.eosIds, [3]);
    assert.equal(tiny.padId, null);
    assert.equal(tiny.chatTemplate!.prompt("ab"), "ab!");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
