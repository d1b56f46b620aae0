// A stand-in for the Hugging Face Hub on 127.0.0.1, for tests (CI has no network). It answers
// the requests aha makes as the Hub does: HEAD/GET on /{datasets/}ORG/NAME/resolve/REV/PATH with
// X-Repo-Commit, ETag (git blob sha1) or X-Linked-Etag (sha256) and X-Linked-Size; LFS files
// (*.safetensors, *.parquet) redirect to a second server, the blob host, which honours Range;
// 401 for a private repository without its token, 404 with X-Error-Code for a missing repo or
// file; the tree API /api/{models,datasets}/ORG/NAME/tree/REV[/PATH]. `dropOnce` makes the blob
// host cut the connection halfway through the first transfer of a file.

import { createHash } from "node:crypto";

export interface StandInRepo {
  type: "model" | "dataset";
  name: string;
  revision?: string; // the branch the files are on; "main" by default
  commit: string;
  files: Map<string, Uint8Array>;
  token?: string; // private: requests must carry it
}

export interface LoggedRequest {
  method: string;
  path: string;
  range: string | null;
  auth: string | null;
}

const isLfs = (path: string) => /\.(safetensors|parquet)$/.test(path);
const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
const gitSha1 = (b: Uint8Array) =>
  createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex");

/** The blob name huggingface_hub gives a file: sha256 for LFS files, git sha1 otherwise. */
export const etagOf = (path: string, bytes: Uint8Array) =>
  isLfs(path) ? sha256(bytes) : gitSha1(bytes);

export class StandInHub {
  readonly requests: LoggedRequest[] = [];
  readonly dropOnce = new Set<string>(); // file paths whose first blob transfer is cut
  private readonly hub: Deno.HttpServer<Deno.NetAddr>;
  private readonly blobs: Deno.HttpServer<Deno.NetAddr>;
  private readonly byHash = new Map<string, { path: string; bytes: Uint8Array }>();

  constructor(readonly repos: StandInRepo[]) {
    const quiet = { hostname: "127.0.0.1", port: 0, onListen: () => {} };
    this.hub = Deno.serve(quiet, (r) => this.answerHub(r));
    this.blobs = Deno.serve(quiet, (r) => this.answerBlob(r));
    for (const repo of repos) {
      for (const [path, bytes] of repo.files) this.byHash.set(sha256(bytes), { path, bytes });
    }
  }

  get url(): string {
    return `http://127.0.0.1:${this.hub.addr.port}`;
  }

  get blobUrl(): string {
    return `http://127.0.0.1:${this.blobs.addr.port}`;
  }

  async close(): Promise<void> {
    await this.hub.shutdown();
    await this.blobs.shutdown();
  }

  private log(request: LoggedRequest, url: URL): void {
    this.requests.push({ ...request, path: decodeURIComponent(url.pathname) });
  }

  private answerHub(r: Request): Response {
    const url = new URL(r.url);
    this.log(
      {
        method: r.method,
        path: url.pathname,
        range: r.headers.get("Range"),
        auth: r.headers.get("Authorization"),
      },
      url,
    );
    const segments = url.pathname.split("/").slice(1).map(decodeURIComponent);
    const api = segments[0] === "api";
    if (api) segments.shift();
    const type = segments[0] === "datasets" || (api && segments[0] === "datasets")
      ? "dataset"
      : "model";
    if (segments[0] === "datasets" || segments[0] === "models") segments.shift();
    const name = `${segments[0]}/${segments[1]}`;
    const action = segments[2]; // "resolve" or "tree"
    const revision = segments[3];
    const path = segments.slice(4).join("/");
    const repo = this.repos.find((x) => x.type === type && x.name === name);
    const notFound = (code: string) =>
      new Response(null, { status: 404, headers: { "X-Error-Code": code } });
    if (!repo) return notFound("RepoNotFound");
    if (repo.token && r.headers.get("Authorization") !== `Bearer ${repo.token}`) {
      return new Response("Invalid credentials", { status: 401 });
    }
    if (revision !== (repo.revision ?? "main") && revision !== repo.commit) {
      return notFound("RevisionNotFound");
    }
    if (api && action === "tree") {
      const entries = [...repo.files].filter(([p]) => path === "" || p.startsWith(`${path}/`))
        .map(([p, bytes]) => ({
          type: "file",
          path: p,
          size: bytes.length,
          oid: gitSha1(bytes),
          ...(isLfs(p)
            ? { lfs: { oid: sha256(bytes), size: bytes.length, pointerSize: 130 } }
            : {}),
        }));
      return Response.json(entries);
    }
    if (action !== "resolve") return notFound("EntryNotFound");
    const bytes = repo.files.get(path);
    if (!bytes) return notFound("EntryNotFound");
    const headers: Record<string, string> = {
      "X-Repo-Commit": repo.commit,
      "Content-Length": String(bytes.length),
    };
    if (isLfs(path)) {
      return new Response(null, {
        status: 302,
        headers: {
          ...headers,
          "Content-Length": "0",
          "X-Linked-Etag": `"${sha256(bytes)}"`,
          "X-Linked-Size": String(bytes.length),
          "ETag": `"${gitSha1(new TextEncoder().encode("a pointer file"))}"`,
          Location: `${this.blobUrl}/blobs/${sha256(bytes)}`,
        },
      });
    }
    return new Response(r.method === "HEAD" ? null : bytes as Uint8Array<ArrayBuffer>, {
      headers: { ...headers, ETag: `"${gitSha1(bytes)}"` },
    });
  }

  private answerBlob(r: Request): Response {
    const url = new URL(r.url);
    const range = r.headers.get("Range");
    this.log(
      { method: r.method, path: url.pathname, range, auth: r.headers.get("Authorization") },
      url,
    );
    const blob = this.byHash.get(url.pathname.split("/").at(-1)!);
    if (!blob) return new Response(null, { status: 404 });
    const from = Number(range?.match(/^bytes=(\d+)-$/)?.[1] ?? 0);
    const body = blob.bytes.subarray(from);
    const headers: Record<string, string> = { "Content-Length": String(body.length) };
    if (range) {
      headers["Content-Range"] = `bytes ${from}-${blob.bytes.length - 1}/${blob.bytes.length}`;
    }
    if (this.dropOnce.delete(blob.path)) {
      // Half the bytes, then the connection is cut.
      const half = body.subarray(0, Math.floor(body.length / 2));
      const stream = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(half);
          setTimeout(() => controller.error(new Error("connection dropped")), 20);
        },
      });
      return new Response(stream, { status: range ? 206 : 200, headers });
    }
    return new Response(body as Uint8Array<ArrayBuffer>, { status: range ? 206 : 200, headers });
  }
}
