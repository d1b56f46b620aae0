// `aha tokenize`: the token ids of a text under a model's tokenizer, optionally after rendering
// it as a user message through the model's chat template — to see exactly what the model sees.

import { parseCommandArgs, required } from "./args.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { loadTokenizer } from "../core/tokenizer.ts";
import { resolveModel } from "../data/hub.ts";

export const help = `usage: aha tokenize --tokenizer DIR [--chat] [--system TEXT] TEXT

Prints {"text": …, "ids": […]}: the text as encoded and its token ids.

  --tokenizer DIR   a Hugging Face model directory (tokenizer.json, or vocab.json + merges.txt,
                    with tokenizer_config.json)
  --chat            TEXT is a user message: render it through the chat template, ending with
                    the prompt for the assistant's reply
  --system TEXT     a system message before it (with --chat; else the template's default)`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("tokenize", args, {
    tokenizer: { type: "string" },
    chat: { type: "boolean" },
    system: { type: "string" },
  }, true);
  const dir = required("tokenize", "tokenizer", values.tokenizer);
  if (positionals.length !== 1) {
    throw new UsageError(`tokenize: expected one TEXT argument, got ${positionals.length}`);
  }
  if (values.system !== undefined && !values.chat) {
    throw new UsageError("tokenize: --system needs --chat");
  }
  const tokenizer = await loadTokenizer(await resolveModel(dir, "config"));
  let text = positionals[0];
  if (values.chat) {
    if (!tokenizer.chatTemplate) throw new AhaError(`${dir}: the tokenizer has no chat template`);
    text = tokenizer.chatTemplate.prompt(text, values.system);
  }
  console.log(JSON.stringify({ text, ids: tokenizer.encode(text) }));
}
