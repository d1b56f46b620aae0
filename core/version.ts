// aha's version, and the commit it was built from: `deno task bundle` (.ci/bundle.ts) writes the
// commit into the bundle it makes; run from a checkout, the checkout's own HEAD is asked.

export const VERSION = "0.2.0";

/** Set in a built bundle or binary; empty in the sources. */
const BUILD_COMMIT = "";

/** The commit: the built-in one, else the git checkout's HEAD beside `entry`, else "unknown". */
export function commitOf(entry: string): string {
  if (BUILD_COMMIT !== "") return BUILD_COMMIT;
  if (!entry.startsWith("file:")) return "unknown";
  try {
    const dir = new URL(".", entry).pathname;
    const out = new Deno.Command("git", {
      args: ["-C", dir, "rev-parse", "--short=12", "HEAD"],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    const commit = new TextDecoder().decode(out.stdout).trim();
    return out.success && commit !== "" ? commit : "unknown";
  } catch {
    return "unknown";
  }
}

/** `aha --version`: aha's version and commit, then Deno's and V8's. */
export function versionText(entry: string): string {
  return `aha ${VERSION} (commit ${commitOf(entry)})\n` +
    `deno ${Deno.version.deno} (v8 ${Deno.version.v8}, typescript ${Deno.version.typescript})`;
}
