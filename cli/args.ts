// Argument parsing shared by every subcommand: node:util parseArgs, with its errors turned into
// one-line usage errors that name the command.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { AhaError, UsageError } from "../core/errors.ts";

type Options = NonNullable<ParseArgsConfig["options"]>;

/** Parse `args` for `command`; unknown flags and missing values become UsageErrors. */
export function parseCommandArgs<O extends Options>(
  command: string,
  args: string[],
  options: O,
  allowPositionals = false,
) {
  try {
    const parsed = parseArgs({ args, options, allowPositionals, strict: true });
    // parseArgs returns null-prototype objects; copy them into plain ones.
    return { values: { ...parsed.values }, positionals: [...parsed.positionals] };
  } catch (e) {
    const message = e instanceof Error ? e.message.split("\n")[0] : String(e);
    throw new UsageError(`${command}: ${message} (see "aha ${command} --help")`);
  }
}

/** The value of a required option, or a UsageError naming it. */
export function required<T>(command: string, name: string, value: T | undefined): T {
  if (value === undefined) {
    throw new UsageError(`${command}: missing --${name} (see "aha ${command} --help")`);
  }
  return value;
}

/** Parse an integer option, or a UsageError naming it. */
export function intOption(
  command: string,
  name: string,
  value: string | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n)) {
    throw new UsageError(`${command}: --${name} must be an integer, got "${value}"`);
  }
  return n;
}

/** Checks before any work that `path` can be written (it is created, empty, if missing). */
export async function checkOutputPath(path: string): Promise<void> {
  try {
    const file = await Deno.open(path, { write: true, create: true });
    file.close();
  } catch (e) {
    const why = e instanceof Deno.errors.IsADirectory || (e as Error).message.includes("directory")
      ? "is a directory"
      : (e as Error).message.split("\n")[0];
    throw new AhaError(`--output ${path}: cannot write (${why})`);
  }
}

/** Writes a command's --output file; a directory or an unwritable path is one line. */
export async function writeOutput(path: string, text: string): Promise<void> {
  try {
    await Deno.writeTextFile(path, text);
  } catch (e) {
    const why = e instanceof Deno.errors.IsADirectory || (e as Error).message.includes("directory")
      ? "is a directory"
      : (e as Error).message.split("\n")[0];
    throw new AhaError(`--output ${path}: cannot write (${why})`);
  }
}
