// `aha init`: write a freshly initialised Qwen2 checkpoint in Hugging Face format.
export const help = "TODO";
export async function run(_args: string[]): Promise<void> {
  await Promise.resolve();
  throw new Error("init: not implemented yet");
}
