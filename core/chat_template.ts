// A model's chat template: the Jinja source from `tokenizer_config.json` (or `chat_template.jinja`
// beside it) rendered with npm @huggingface/jinja, the way transformers' apply_chat_template does.

import { Template } from "@huggingface/jinja";
import { AhaError } from "./errors.ts";

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

type Json = Record<string, unknown>;

export class ChatTemplate {
  private template: Template;

  /** `source` is Jinja; `tokens` are the variables templates use (bos_token, eos_token, …). */
  constructor(source: string, private tokens: Record<string, string>, private file: string) {
    try {
      this.template = new Template(source);
    } catch (e) {
      throw new AhaError(`${file}: cannot parse the chat template: ${(e as Error).message}`);
    }
  }

  /** The template of model directory `dir` given its parsed tokenizer_config.json, or null. */
  static async load(dir: string, config: Json): Promise<ChatTemplate | null> {
    const tokens: Record<string, string> = {};
    for (const name of ["bos_token", "eos_token", "pad_token", "unk_token"]) {
      const v = config[name];
      const content = typeof v === "object" && v !== null ? (v as Json).content : v;
      if (typeof content === "string") tokens[name] = content;
    }
    let source = config.chat_template;
    if (Array.isArray(source)) { // several named templates: take the default one
      source = source.find((t) => t?.name === "default")?.template;
    }
    if (typeof source === "string") {
      return new ChatTemplate(source, tokens, `${dir}/tokenizer_config.json`);
    }
    try {
      const file = `${dir}/chat_template.jinja`;
      return new ChatTemplate(await Deno.readTextFile(file), tokens, file);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return null;
      throw e;
    }
  }

  /** The conversation as the model sees it; with `addGenerationPrompt` it ends where the reply starts. */
  render(messages: ChatMessage[], addGenerationPrompt = true): string {
    try {
      return this.template.render({
        ...this.tokens,
        messages,
        add_generation_prompt: addGenerationPrompt,
      });
    } catch (e) {
      throw new AhaError(`${this.file}: chat template failed: ${(e as Error).message}`);
    }
  }

  /** The prompt for one user message, after an optional system message, ready for the reply. */
  prompt(user: string, system?: string): string {
    const messages: ChatMessage[] = system === undefined
      ? []
      : [{ role: "system", content: system }];
    return this.render([...messages, { role: "user", content: user }]);
  }
}
