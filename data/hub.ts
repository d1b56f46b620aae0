// Hugging Face Hub ids ("Qwen/Qwen2.5-0.5B", "openai/gsm8k@main") resolved to local files in the
// Hugging Face cache, laid out exactly as Python's huggingface_hub lays it out, so that what
// Python tools downloaded is used as is and what aha downloads is visible to them:
//
//   $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//     models--ORG--NAME/
//       blobs/<etag>                       file contents, named by git sha1 or LFS sha256
//       refs/<revision>                    the commit a branch or tag resolved to
//       snapshots/<commit>/<path>          relative symlinks to ../../blobs/<etag>
//       .no_exist/<commit>/<path>          empty markers: the Hub has no such file
//
// Every command resolves model and dataset ids through this one file. A path that exists
// locally stays a path. The cache is consulted first: a snapshot that already holds every file
// needed is used without any network request (offline-first); otherwise the missing files are
// fetched with huggingface_hub's protocol — a HEAD on /resolve/ gives X-Repo-Commit, the etag
// (X-Linked-Etag, else ETag), the size (X-Linked-Size) and, for large files, a redirect to the
// blob host; the GET resumes a partial `<etag>.incomplete` with a Range header, retries a
// dropped connection, and the size and hash are checked before the blob is renamed into place.
// Listing a repository's files (for --include globs and Parquet shards) uses the tree API
// through @huggingface/hub's listFiles; its downloadFileToCacheDir is not used, because it
// holds a whole file in memory, cannot resume, shows no progress and checks no hash.

import { createHash } from "node:crypto";
import { listFiles } from "@huggingface/hub";
import { AhaError } from "../core/errors.ts";

export interface HubSettings {
  endpoint: string; // HF_ENDPOINT
  token: string | null; // HF_TOKEN, else the token file
  cacheDir: string; // HF_HUB_CACHE, else $HF_HOME/hub
  offline: boolean; // HF_HUB_OFFLINE=1
  /** A progress bar on standard error (only when it is a terminal). */
  progress: boolean;
  log: (line: string) => void;
}

/** The settings the environment gives, as huggingface_hub reads them. */
export function hubSettings(env: Record<string, string> = Deno.env.toObject()): HubSettings {
  const home = env.HF_HOME ?? `${env.XDG_CACHE_HOME ?? `${env.HOME ?? "."}/.cache`}/huggingface`;
  let token = env.HF_TOKEN?.trim() || null;
  if (token === null) {
    try {
      token = Deno.readTextFileSync(env.HF_TOKEN_PATH ?? `${home}/token`).trim() || null;
    } catch {
      token = null;
    }
  }
  return {
    endpoint: (env.HF_ENDPOINT ?? "https://huggingface.co").replace(/\/+$/, ""),
    token,
    cacheDir: env.HF_HUB_CACHE ?? `${home}/hub`,
    offline: ["1", "true", "yes", "on"].includes((env.HF_HUB_OFFLINE ?? "").toLowerCase()),
    progress: Deno.stderr.isTerminal(),
    log: (line) => console.error(line),
  };
}

export type RepoType = "model" | "dataset";

export interface RepoRef {
  type: RepoType;
  name: string; // ORG/NAME
  revision: string; // a branch, tag or commit; "main" by default
}

const HUB_ID = /^([A-Za-z0-9][\w.-]*)\/([\w.-]+)(?:@(.+))?$/;
const COMMIT = /^[0-9a-f]{40}$/;

/** `ORG/NAME[@revision]` as a repository reference, or null when `text` is not shaped so. */
export function parseHubId(text: string, type: RepoType = "model"): RepoRef | null {
  const m = text.match(HUB_ID);
  if (!m || m[2] === "." || m[2] === "..") return null;
  return { type, name: `${m[1]}/${m[2]}`, revision: m[3] ?? "main" };
}

const pathExists = (path: string) => Deno.lstat(path).then(() => true, () => false);

/** Whether `text` should be read as a Hub id: shaped like one and not an existing local path. */
export async function isHubId(text: string): Promise<boolean> {
  return parseHubId(text) !== null && !(await pathExists(text));
}

/** models--ORG--NAME (or datasets--…) under the cache. */
export function repoFolder(repo: RepoRef, settings: HubSettings): string {
  return `${settings.cacheDir}/${repo.type}s--${repo.name.replaceAll("/", "--")}`;
}

// ---------------------------------------------------------------------------------------------
// Models.

/** What a model directory needs: `weights` false for commands that read only the config. */
export type ModelFiles = "model" | "config" | "adapter";

const TOKENIZER_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
  "generation_config.json",
  "aha_tokenizer.json", // aha's own arithmetic models (data/tasks.ts ARITHMETIC_TOKENIZER_FILE)
];

/**
 * A model directory for `pathOrId`: the path itself when it exists (or is no Hub id), else the
 * snapshot of the Hub id in the cache, fetching what is missing (config.json, tokenizer files,
 * and the weights: model.safetensors, or the shards model.safetensors.index.json lists).
 */
export async function resolveModel(
  pathOrId: string,
  files: ModelFiles = "model",
  settings: HubSettings = hubSettings(),
): Promise<string> {
  if (await pathExists(pathOrId)) return pathOrId;
  const repo = parseHubId(pathOrId);
  // Not shaped like an id: a path, whose loader says what is missing there.
  if (repo === null) return pathOrId;
  try {
    return await fetchSnapshot(repo, modelFileList(files), settings, false);
  } catch (e) {
    if (e instanceof AhaError && / not found on /.test(e.message)) {
      throw new AhaError(`${pathOrId}: no such local directory, and ${e.message}`);
    }
    throw e;
  }
}

/** `path` of the Hub id's snapshot when the cache already has it (never asks the Hub), else null:
 * for commands that only peek, like `aha plan` reading config.json. */
export async function cachedFile(
  id: string,
  path: string,
  settings: HubSettings = hubSettings(),
): Promise<string | null> {
  const repo = parseHubId(id);
  if (repo === null || await pathExists(id)) return null;
  const commit = await readRef(repoFolder(repo, settings), repo.revision);
  const file = `${repoFolder(repo, settings)}/snapshots/${commit}/${path}`;
  return commit !== null && await fileExists(file) ? file : null;
}

/** The files of a model snapshot, as `fetchSnapshot` takes them. */
function modelFileList(files: ModelFiles): FileList {
  if (files === "adapter") {
    return { required: ["adapter_config.json", "adapter_model.safetensors"], optional: [] };
  }
  // The index is small and names the shards: fetched with the config, so that an offline run
  // can say which shards are missing.
  const required = ["config.json"];
  const optional = [...TOKENIZER_FILES, "model.safetensors.index.json"];
  if (files === "config") return { required, optional };
  return {
    required,
    optional,
    // The index, when the Hub has one, names the shards; else there is one file.
    more: async (have) => {
      const index = have("model.safetensors.index.json");
      if (index === null) return { required: ["model.safetensors"], optional: [] };
      let shards: string[];
      try {
        const map = JSON.parse(await Deno.readTextFile(index)).weight_map;
        shards = [...new Set(Object.values(map as Record<string, string>))];
      } catch (e) {
        throw new AhaError(`${index}: not a safetensors index (${(e as Error).message})`);
      }
      return { required: shards, optional: [] };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Datasets: the Parquet files the Hub converts every dataset to, on refs/convert/parquet.

export const PARQUET_REVISION = "refs/convert/parquet";

/** The local Parquet files of one config and split of a Hub dataset, fetched when missing. */
export async function resolveDatasetSplit(
  id: string,
  config: string,
  split: string,
  settings: HubSettings = hubSettings(),
): Promise<string[]> {
  const parsed = parseHubId(id, "dataset");
  if (parsed === null) throw new AhaError(`dataset.path: "${id}" is neither a file nor a Hub id`);
  const repo: RepoRef = { ...parsed, revision: PARQUET_REVISION };
  const where = `${config}/${split}`;
  const folder = repoFolder(repo, settings);
  // In the cache already: the snapshot the ref points to has the split's folder.
  const commit = await readRef(folder, repo.revision);
  if (commit !== null) {
    const cached = await parquetIn(`${folder}/snapshots/${commit}/${where}`);
    if (cached.length > 0) return cached;
  }
  if (settings.offline) {
    throw new AhaError(
      `HF_HUB_OFFLINE is set and ${id} (${where}) is not in the cache ${folder}`,
    );
  }
  const paths = (await listRepo(repo, settings, where)).filter((p) => p.endsWith(".parquet"));
  if (paths.length === 0) {
    throw new AhaError(
      `${id}: the Hub has no Parquet files for config "${config}", split "${split}" ` +
        `(${PARQUET_REVISION}: ${where}/); check dataset.config and dataset.split`,
    );
  }
  const dir = await fetchSnapshot(repo, { required: paths.sort(), optional: [] }, settings, true);
  return paths.map((p) => `${dir}/${p}`);
}

async function parquetIn(dir: string): Promise<string[]> {
  const names: string[] = [];
  try {
    for await (const e of Deno.readDir(dir)) if (e.name.endsWith(".parquet")) names.push(e.name);
  } catch {
    return [];
  }
  return names.sort().map((n) => `${dir}/${n}`);
}

// ---------------------------------------------------------------------------------------------
// Listing (the tree API, through @huggingface/hub).

/** Every file path of a repository at its revision (under `folder` when given). */
export async function listRepo(
  repo: RepoRef,
  settings: HubSettings,
  folder?: string,
): Promise<string[]> {
  const paths: string[] = [];
  try {
    for await (
      const entry of listFiles({
        repo: { type: repo.type, name: repo.name },
        revision: encodeURIComponent(repo.revision),
        path: folder,
        recursive: true,
        hubUrl: settings.endpoint,
        accessToken: settings.token ?? undefined,
      })
    ) {
      if (entry.type === "file") paths.push(entry.path);
    }
  } catch (e) {
    const status = (e as { statusCode?: number }).statusCode;
    throw hubError(repo, folder ?? "", status ?? 0, (e as Error).message, settings);
  }
  return paths;
}

/** `*` within a path segment, `**` across segments, `?` one character. */
export function globMatcher(globs: string[]): (path: string) => boolean {
  const patterns = globs.map((glob) => {
    const source = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&")
      .replace(/\*\*\/?|\*|\?/g, (m) => m === "?" ? "[^/]" : m === "*" ? "[^/]*" : ".*");
    return new RegExp(`^${source}$`);
  });
  return (path) => patterns.some((p) => p.test(path));
}

/** `aha download`: the snapshot of `repo` with the files matching `include` (all when empty). */
export async function downloadRepo(
  repo: RepoRef,
  include: string[],
  settings: HubSettings = hubSettings(),
): Promise<string> {
  if (include.length === 0 && repo.type === "model") {
    return await fetchSnapshot(repo, modelFileList("model"), settings, true);
  }
  if (settings.offline) {
    throw new AhaError(`HF_HUB_OFFLINE is set: cannot list the files of ${repo.name}`);
  }
  const matches = globMatcher(include.length ? include : ["**"]);
  const paths = (await listRepo(repo, settings)).filter(matches);
  if (paths.length === 0) {
    throw new AhaError(`${repo.name}: no file matches ${include.join(" ")}`);
  }
  return await fetchSnapshot(repo, { required: paths, optional: [] }, settings, true);
}

// ---------------------------------------------------------------------------------------------
// Snapshots: the cache first, then the Hub for what is missing.

interface FileList {
  required: string[];
  optional: string[];
  /** More files, decided once these are present (the shards of an index). */
  more?: (have: (path: string) => string | null) => Promise<FileList>;
}

/**
 * The snapshot directory of `repo` holding `files`. Without `refresh`, a snapshot in the cache
 * that holds every file (optional ones present or marked absent) is used without the network.
 */
async function fetchSnapshot(
  repo: RepoRef,
  files: FileList,
  settings: HubSettings,
  refresh: boolean,
): Promise<string> {
  const folder = repoFolder(repo, settings);
  const cachedCommit = COMMIT.test(repo.revision)
    ? repo.revision
    : await readRef(folder, repo.revision);
  if (cachedCommit !== null && (settings.offline || !refresh)) {
    const missing = await missingInSnapshot(folder, cachedCommit, files, settings.offline);
    if (missing.length === 0) return `${folder}/snapshots/${cachedCommit}`;
    if (settings.offline) throw offlineError(repo, folder, missing);
  } else if (settings.offline) {
    throw offlineError(repo, folder, ["everything (no snapshot for this revision)"]);
  }
  // Online: every file through the Hub (cheap HEAD requests for what is cached already).
  let commit: string | null = null;
  let list: FileList | undefined = files;
  const present = new Map<string, string>();
  while (list) {
    for (
      const [path, required] of [
        ...list.required.map((p) => [p, true] as const),
        ...list.optional.map((p) => [p, false] as const),
      ]
    ) {
      const got = await fetchFile({ ...repo, revision: commit ?? repo.revision }, path, settings);
      if (got === null) {
        if (required) {
          throw new AhaError(`${repo.name}@${repo.revision}: the Hub has no file ${path}`);
        }
        continue;
      }
      commit ??= got.commit;
      if (commit !== got.commit) {
        throw new AhaError(`${repo.name}: the revision moved while downloading; run again`);
      }
      present.set(path, got.file);
    }
    list = await list.more?.((p) => present.get(p) ?? null);
  }
  if (commit !== null && repo.revision !== commit) await writeRef(folder, repo.revision, commit);
  return `${folder}/snapshots/${commit}`;
}

async function readRef(folder: string, revision: string): Promise<string | null> {
  if (COMMIT.test(revision)) return revision;
  try {
    const commit = (await Deno.readTextFile(`${folder}/refs/${revision}`)).trim();
    return COMMIT.test(commit) ? commit : null;
  } catch {
    return null;
  }
}

async function writeRef(folder: string, revision: string, commit: string): Promise<void> {
  const path = `${folder}/refs/${revision}`;
  await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
  await Deno.writeTextFile(path, commit); // huggingface_hub writes the bare hash, no newline
}

/** Files of `list` not in the snapshot (optional ones count only online, unless marked absent). */
async function missingInSnapshot(
  folder: string,
  commit: string,
  files: FileList,
  offline: boolean,
): Promise<string[]> {
  const snapshot = `${folder}/snapshots/${commit}`;
  const missing: string[] = [];
  const present = new Map<string, string>();
  let list: FileList | undefined = files;
  while (list) {
    for (const path of list.required) {
      if (await fileExists(`${snapshot}/${path}`)) present.set(path, `${snapshot}/${path}`);
      else missing.push(path);
    }
    for (const path of list.optional) {
      if (await fileExists(`${snapshot}/${path}`)) present.set(path, `${snapshot}/${path}`);
      else if (!offline && !(await pathExists(`${folder}/.no_exist/${commit}/${path}`))) {
        missing.push(path);
      }
    }
    if (missing.length > 0) return missing;
    list = await list.more?.((p) => present.get(p) ?? null);
  }
  return missing;
}

const fileExists = (path: string) => Deno.stat(path).then((s) => s.isFile, () => false);

function offlineError(repo: RepoRef, folder: string, missing: string[]): AhaError {
  return new AhaError(
    `HF_HUB_OFFLINE is set and ${repo.name}@${repo.revision} is not complete in the cache ` +
      `${folder}: missing ${missing.join(", ")}`,
  );
}

// ---------------------------------------------------------------------------------------------
// One file: huggingface_hub's protocol.

interface FileMeta {
  commit: string;
  etag: string;
  size: number;
  url: string; // where the bytes are (the blob host after a redirect)
}

function resolveUrl(repo: RepoRef, path: string, settings: HubSettings): string {
  const prefix = repo.type === "model" ? "" : `${repo.type}s/`;
  const encodedPath = path.split("/").map(encodeURIComponent).join("/");
  return `${settings.endpoint}/${prefix}${repo.name}/resolve/${
    encodeURIComponent(repo.revision)
  }/${encodedPath}`;
}

function authHeaders(url: string, settings: HubSettings): Record<string, string> {
  // The token goes to the Hub only, never to the blob host a redirect leads to.
  const toHub = new URL(url).origin === new URL(settings.endpoint).origin;
  return settings.token && toHub ? { Authorization: `Bearer ${settings.token}` } : {};
}

function hubError(
  repo: RepoRef,
  path: string,
  status: number,
  detail: string,
  settings: HubSettings,
): AhaError {
  const what = `${repo.name}@${repo.revision}${path ? ` (${path})` : ""}`;
  if (status === 401 || status === 403) {
    return new AhaError(
      `${what}: the Hub refused access (${status}): the repository is private or gated — ` +
        (settings.token
          ? "the token in HF_TOKEN / the token file has no access to it"
          : "set HF_TOKEN or log in (huggingface-cli login)"),
    );
  }
  if (status === 404) return new AhaError(`${what}: not found on ${settings.endpoint} (${detail})`);
  return new AhaError(`${what}: ${settings.endpoint} answered ${status || detail}`);
}

/** HEAD on the resolve URL; relative redirects (renamed repositories) are followed. */
async function fileMeta(
  repo: RepoRef,
  path: string,
  settings: HubSettings,
): Promise<FileMeta | null> {
  let url = resolveUrl(repo, path, settings);
  for (let hops = 0; hops < 5; hops++) {
    let response: Response;
    try {
      response = await fetch(url, {
        method: "HEAD",
        redirect: "manual",
        headers: { ...authHeaders(url, settings), "Accept-Encoding": "identity" },
      });
    } catch (e) {
      throw new AhaError(
        `${repo.name}: cannot reach ${settings.endpoint} (${(e as Error).message}); ` +
          "set HF_HUB_OFFLINE=1 to use the cache only",
      );
    }
    await response.body?.cancel();
    const h = response.headers;
    if (response.status === 404 && h.get("X-Error-Code") === "EntryNotFound") return null;
    if (response.status >= 400) {
      throw hubError(repo, path, response.status, h.get("X-Error-Message") ?? "", settings);
    }
    const location = h.get("Location");
    const commit = h.get("X-Repo-Commit");
    const etag = (h.get("X-Linked-Etag") ?? h.get("ETag") ?? "").replace(/^W\//, "")
      .replaceAll('"', "");
    const size = Number(h.get("X-Linked-Size") ?? h.get("Content-Length"));
    if (response.status >= 300 && location) {
      const next = new URL(location, url).href;
      // A redirect on the Hub itself (a renamed repository): ask again there.
      if (commit === null && new URL(next).origin === new URL(url).origin) {
        url = next;
        continue;
      }
      if (commit && etag && Number.isFinite(size)) return { commit, etag, size, url: next };
    }
    if (commit === null || etag === "" || !Number.isFinite(size)) {
      throw new AhaError(
        `${repo.name}: ${url} did not answer as the Hub does (no X-Repo-Commit, ETag or size)`,
      );
    }
    return { commit, etag, size, url };
  }
  throw new AhaError(`${repo.name}: too many redirects for ${path}`);
}

/** One file into the cache: the snapshot symlink, the blob (downloaded if missing), the ref. */
async function fetchFile(
  repo: RepoRef,
  path: string,
  settings: HubSettings,
): Promise<{ commit: string; file: string } | null> {
  const folder = repoFolder(repo, settings);
  const meta = await fileMeta(repo, path, settings);
  if (meta === null) {
    // Remembered as huggingface_hub does, so offline runs know the Hub has no such file.
    const commit = await readRef(folder, repo.revision);
    if (commit !== null) {
      const marker = `${folder}/.no_exist/${commit}/${path}`;
      await Deno.mkdir(marker.slice(0, marker.lastIndexOf("/")), { recursive: true });
      await Deno.writeFile(marker, new Uint8Array());
    }
    return null;
  }
  if (!COMMIT.test(repo.revision)) await writeRef(folder, repo.revision, meta.commit);
  const pointer = `${folder}/snapshots/${meta.commit}/${path}`;
  if (await fileExists(pointer)) return { commit: meta.commit, file: pointer };
  const blob = `${folder}/blobs/${meta.etag}`;
  if (!(await fileExists(blob))) await downloadBlob(repo, path, meta, blob, settings);
  await Deno.mkdir(pointer.slice(0, pointer.lastIndexOf("/")), { recursive: true });
  const depth = path.split("/").length + 1; // snapshots/<commit>/<path…> up to the repo folder
  await Deno.remove(pointer).catch(() => {}); // a dangling link from an older blob
  await Deno.symlink(`${"../".repeat(depth)}blobs/${meta.etag}`, pointer);
  return { commit: meta.commit, file: pointer };
}

const ATTEMPTS = 5;

/** The bytes of one blob into `<blob>.incomplete`, resumed after a dropped connection or an
 * earlier run; size and hash checked; then renamed to `blob`. */
async function downloadBlob(
  repo: RepoRef,
  path: string,
  meta: FileMeta,
  blob: string,
  settings: HubSettings,
): Promise<void> {
  await Deno.mkdir(blob.slice(0, blob.lastIndexOf("/")), { recursive: true });
  const partial = `${blob}.incomplete`;
  const progress = new Progress(path, meta.size, settings);
  let discardedCorrupt = false;
  let lastError = "";
  for (let attempt = 0; attempt < ATTEMPTS;) {
    let have = await Deno.stat(partial).then((s) => s.size, () => 0);
    if (have > meta.size) {
      await Deno.truncate(partial, 0);
      have = 0;
    }
    if (have < meta.size) {
      try {
        await appendRange(meta.url, partial, have, settings, progress);
      } catch (e) {
        if (e instanceof AhaError) throw e;
        lastError = (e as Error).message;
        attempt++;
        await new Promise((r) => setTimeout(r, 200 * attempt));
        continue;
      }
      have = await Deno.stat(partial).then((s) => s.size, () => 0);
      if (have !== meta.size) {
        lastError = `got ${have} of ${meta.size} bytes`;
        attempt++;
        continue;
      }
    }
    const problem = await checkContent(partial, meta);
    if (problem === null) {
      progress.done();
      await Deno.rename(partial, blob);
      return;
    }
    // A partial file from elsewhere that does not continue into these bytes: start over once.
    await Deno.truncate(partial, 0);
    if (discardedCorrupt) {
      throw new AhaError(`${repo.name}: ${path} from ${meta.url}: ${problem}`);
    }
    settings.log(`${repo.name}: ${path}: ${problem}; the partial download was discarded`);
    discardedCorrupt = true;
  }
  progress.done();
  throw new AhaError(
    `${repo.name}: downloading ${path} failed ${ATTEMPTS} times (${lastError}); ` +
      `run again to resume from ${partial}`,
  );
}

/** GET `url` from byte `from` on, appended to `file`. */
async function appendRange(
  url: string,
  file: string,
  from: number,
  settings: HubSettings,
  progress: Progress,
): Promise<void> {
  const headers: Record<string, string> = {
    ...authHeaders(url, settings),
    "Accept-Encoding": "identity",
  };
  if (from > 0) headers.Range = `bytes=${from}-`;
  const response = await fetch(url, { headers });
  if (response.status === 401 || response.status === 403 || response.status === 404) {
    await response.body?.cancel();
    throw new AhaError(`${url}: the blob host answered ${response.status}`);
  }
  if (!response.ok || !response.body) {
    await response.body?.cancel();
    throw new Error(`HTTP ${response.status}`);
  }
  // A server that ignores Range sends everything: write from the start.
  const resumed = from > 0 && response.status === 206;
  const out = await Deno.open(file, {
    write: true,
    create: true,
    append: resumed,
    truncate: !resumed,
  });
  let written = resumed ? from : 0;
  try {
    for await (const chunk of response.body) {
      await writeAll(out, chunk);
      written += chunk.length;
      progress.update(written);
    }
  } finally {
    out.close();
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await file.write(bytes.subarray(at));
}

/** null when the file has the size and hash the Hub announced. An etag of 64 hex digits is the
 * sha256 of an LFS file; one of 40 is the git blob sha1 of a regular file. */
async function checkContent(path: string, meta: FileMeta): Promise<string | null> {
  const size = (await Deno.stat(path)).size;
  if (size !== meta.size) return `size ${size}, expected ${meta.size}`;
  const etag = meta.etag.toLowerCase();
  const algorithm = /^[0-9a-f]{64}$/.test(etag)
    ? "sha256"
    : /^[0-9a-f]{40}$/.test(etag)
    ? "sha1"
    : null;
  if (algorithm === null) return null; // an etag that is no content hash: size only
  const hash = createHash(algorithm);
  if (algorithm === "sha1") hash.update(`blob ${size}\0`);
  const file = await Deno.open(path);
  try {
    for await (const chunk of file.readable) hash.update(chunk);
  } catch (e) {
    throw new AhaError(`${path}: cannot read (${(e as Error).message})`);
  }
  const got = hash.digest("hex");
  return got === etag ? null : `content hash ${got} is not the announced ${etag}`;
}

/** A one-line progress bar on a terminal; nothing otherwise but one line per file. */
class Progress {
  private last = 0;
  private readonly started = performance.now();

  constructor(
    private readonly name: string,
    private readonly total: number,
    private readonly settings: HubSettings,
  ) {
    if (!settings.progress) settings.log(`downloading ${name} (${megabytes(total)})`);
  }

  update(bytes: number): void {
    const now = performance.now();
    if (!this.settings.progress || (now - this.last < 100 && bytes < this.total)) return;
    this.last = now;
    const width = 24, filled = Math.round((bytes / Math.max(1, this.total)) * width);
    const rate = bytes / 1e6 / Math.max(1e-3, (now - this.started) / 1000);
    const text = `\r${this.name} ${"█".repeat(filled)}${"░".repeat(width - filled)} ` +
      `${megabytes(bytes)} / ${megabytes(this.total)} ${rate.toFixed(1)} MB/s `;
    Deno.stderr.writeSync(new TextEncoder().encode(text));
  }

  done(): void {
    if (this.settings.progress && this.last > 0) {
      Deno.stderr.writeSync(new TextEncoder().encode("\n"));
    }
  }
}

const megabytes = (bytes: number) => `${(bytes / 1e6).toFixed(1)} MB`;
