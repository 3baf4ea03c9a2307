/**
 * Shared context documents: reads that fetch only a compressed delta from
 * the copy this client already has, writes against a version vector, CRDT
 * updates, read-modify-write that retries on conflict, and watches.
 *
 * A plain document's write names the vector it read (`base`) and is refused
 * with ConflictError if another writer got in first; {@link Context.update}
 * does the read-modify-write loop for you. A document created with a CRDT
 * merge type merges concurrent writes instead.
 */
import { Code, ConnectError, type Client as RpcClient } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import jsonpatch from "fast-json-patch";
import { decompress } from "fzstd";
import {
  type ContextWriteResponse,
  type CrdtOpSchema,
  type GetContextResponse,
  MergeType,
  SharedContext,
} from "./gen/statefabric/state/v1/context_pb.js";
import { ConflictError, FencedError, InvalidArgumentError, NotFoundError, fromConnectError } from "./errors.js";
import { type Fence, type HeldLock, fenceOf } from "./locks.js";
import {
  Backoff,
  type CallSettings,
  decoder,
  fromJsonBytes,
  options,
  sleep,
  toJsonBytes,
  unary,
} from "./rpc.js";

export { MergeType };

export type Vector = Record<string, number>;

export interface Document {
  id: string;
  merge: MergeType;
  content: unknown;
  vector: Vector;
  revision: number;
  updatedAt: string;
}

export interface Written {
  revision: number;
  vector: Vector;
  /** True when an idempotency key matched an earlier write. */
  replayed: boolean;
}

export interface Change {
  revision: number;
  vector: Vector;
  deleted: boolean;
  content: unknown;
}

export interface WriteOptions extends CallSettings {
  idempotencyKey?: string;
  fence?: Fence | HeldLock;
}

type CrdtOp = MessageInitShape<typeof CrdtOpSchema>;

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

/** CRDT operations for {@link Context.merge}. */
export const Crdt = {
  /** LWW register: the new value. */
  set: (value: unknown): CrdtOp => ({ op: { case: "setJson", value: toJsonBytes(value) } }),
  /** LWW map: set a key. */
  put: (key: string, value: unknown): CrdtOp => ({
    op: { case: "mapPut", value: { key, valueJson: toJsonBytes(value) } },
  }),
  /** LWW map: remove a key. */
  removeKey: (key: string): CrdtOp => ({ op: { case: "mapRemove", value: key } }),
  /** OR-set: add an element. */
  add: (element: unknown): CrdtOp => ({ op: { case: "addJson", value: toJsonBytes(element) } }),
  /** OR-set: remove an element as this sidecar sees it. */
  remove: (element: unknown): CrdtOp => ({ op: { case: "removeJson", value: toJsonBytes(element) } }),
  /** PN-counter: add `by` (negative to subtract); leaving int64 is refused, never wrapped. */
  increment: (by: number | bigint): CrdtOp => {
    const value = BigInt(by);
    if (value < INT64_MIN || value > INT64_MAX) {
      throw new InvalidArgumentError("an increment is a signed 64-bit integer", undefined, "increment");
    }
    return { op: { case: "increment", value } };
  },
};

/** `base` with a zstd-compressed JSON Patch (RFC 6902) applied. */
export function applyDelta(base: unknown, compressed: Uint8Array): unknown {
  try {
    const patch = JSON.parse(decoder.decode(decompress(compressed))) as jsonpatch.Operation[];
    return jsonpatch.applyPatch(structuredClone(base), patch, true, false).newDocument;
  } catch (error) {
    throw new InvalidArgumentError(`the sidecar's delta does not apply: ${String(error)}`);
  }
}

function vectorOf(base: Vector | Document | undefined): { counters: Record<string, bigint> } {
  const vector = base && "vector" in base && "revision" in base ? (base as Document).vector : (base as Vector | undefined);
  return { counters: Object.fromEntries(Object.entries(vector ?? {}).map(([k, v]) => [k, BigInt(v)])) };
}

function vectorFrom(counters: Record<string, bigint> | undefined): Vector {
  return Object.fromEntries(Object.entries(counters ?? {}).map(([k, v]) => [k, Number(v)]));
}

function written(r: ContextWriteResponse): Written {
  return { revision: Number(r.revision), vector: vectorFrom(r.vector?.counters), replayed: r.replayed };
}

/**
 * The `SharedContext` service, with a local copy of the documents read (at
 * most `localCopies`, least recently used out) so a repeated read transfers
 * only what changed.
 */
/** A document from the sidecar's answer, its content already resolved (whole body, or delta applied). */
function documentOf(r: GetContextResponse, content: unknown): Document {
  return {
    id: r.documentId,
    merge: r.mergeType,
    content,
    vector: vectorFrom(r.vector?.counters),
    revision: Number(r.revision),
    updatedAt: r.updatedAt,
  };
}

export class Context {
  private readonly copies = new Map<string, Document>();

  constructor(
    private readonly rpc: RpcClient<typeof SharedContext>,
    private readonly timeoutMs: number,
    private readonly localCopies = 256,
  ) {}

  private remember(id: string, doc: Document | undefined): void {
    this.copies.delete(id);
    if (!doc || this.localCopies === 0) return;
    this.copies.set(id, doc);
    while (this.copies.size > this.localCopies) {
      const oldest = this.copies.keys().next().value;
      if (oldest === undefined) break;
      this.copies.delete(oldest);
    }
  }

  /** The document (undefined when absent or deleted); after the first read, only a delta travels. */
  async get(id: string, settings?: CallSettings): Promise<Document | undefined> {
    const known = this.copies.get(id);
    let r;
    try {
      r = await unary(
        this.rpc.getContext(
          { documentId: id, knownRevision: BigInt(known?.revision ?? 0) },
          options(this.timeoutMs, settings),
        ),
      );
    } catch (error) {
      if (error instanceof NotFoundError) {
        this.remember(id, undefined);
        return undefined;
      }
      throw error;
    }
    if (r.deleted) {
      this.remember(id, undefined);
      return undefined;
    }
    let content: unknown = null;
    if (r.body.case === "deltaZstd" && known) content = applyDelta(known.content, r.body.value);
    else if (r.body.case === "contentJson") content = fromJsonBytes(r.body.value);
    else if (known && Number(r.revision) === known.revision) content = structuredClone(known.content);
    return this.keep(id, documentOf(r, content));
  }

  /** Keeps `doc` as the local copy of `id` and hands the caller a copy of its own. */
  private keep(id: string, doc: Document): Document {
    this.remember(id, doc);
    return { ...doc, content: structuredClone(doc.content) };
  }

  /** Many documents in one call (at most 1,000 ids): those that exist, in the order asked; absent and deleted ones are left out. */
  async getMany(ids: readonly string[], settings?: CallSettings): Promise<Document[]> {
    const r = await unary(this.rpc.getContexts({ documentIds: [...ids] }, options(this.timeoutMs, settings)));
    const found: Document[] = [];
    for (const d of r.documents) {
      const content = d.body.case === "contentJson" ? fromJsonBytes(d.body.value) : null;
      found.push(this.keep(d.documentId, documentOf(d, content)));
    }
    for (const missing of r.missing) this.remember(missing, undefined);
    return found;
  }

  /** Creates (`base` absent) or replaces a document if nothing changed since `base`; sets an LWW register. */
  async put(
    id: string,
    content: unknown,
    opts: WriteOptions & { base?: Vector | Document; merge?: MergeType } = {},
  ): Promise<Written> {
    const request = {
      documentId: id,
      mergeType: opts.merge ?? MergeType.NONE,
      base: vectorOf(opts.base),
      contentJson: toJsonBytes(content),
      fence: fenceOf(opts.fence),
    };
    return written(await unary(this.rpc.putContext(request, options(this.timeoutMs, opts, opts.idempotencyKey))));
  }

  /** Applies a JSON Patch (RFC 6902) to a plain document if nothing changed since `base`. */
  async patch(
    id: string,
    operations: object[],
    opts: WriteOptions & { base: Vector | Document },
  ): Promise<Written> {
    const request = {
      documentId: id,
      base: vectorOf(opts.base),
      patchJson: toJsonBytes(operations),
      fence: fenceOf(opts.fence),
    };
    return written(await unary(this.rpc.patchContext(request, options(this.timeoutMs, opts, opts.idempotencyKey))));
  }

  /** Applies CRDT operations ({@link Crdt}); concurrent merges combine. */
  async merge(id: string, merge: MergeType, ops: CrdtOp[], opts: WriteOptions = {}): Promise<Written> {
    if (merge === MergeType.NONE) throw new InvalidArgumentError("merge needs a CRDT merge type", undefined, "merge");
    const request = { documentId: id, mergeType: merge, ops, fence: fenceOf(opts.fence) };
    return written(await unary(this.rpc.mergeContext(request, options(this.timeoutMs, opts, opts.idempotencyKey))));
  }

  async delete(id: string, opts: WriteOptions & { base: Vector | Document }): Promise<Written> {
    const request = { documentId: id, base: vectorOf(opts.base), fence: fenceOf(opts.fence) };
    const result = written(
      await unary(this.rpc.deleteContext(request, options(this.timeoutMs, opts, opts.idempotencyKey))),
    );
    this.remember(id, undefined);
    return result;
  }

  /**
   * Read-modify-write of a plain document: reads it, calls `change(content)`
   * (null when absent; it returns the new content, or undefined after
   * changing it in place; it may be async), and writes against the vector
   * read. When another writer got in first, does it all again, up to
   * `attempts` times with a short jittered pause, then throws the last
   * ConflictError. A fenced write refused is not retried.
   */
  async update(
    id: string,
    change: (content: any) => unknown,
    opts: { attempts?: number; fence?: Fence | HeldLock } = {},
  ): Promise<Written> {
    const backoff = new Backoff(5, 200);
    let last: ConflictError | undefined;
    for (let i = 0; i < Math.max(1, opts.attempts ?? 10); i++) {
      const doc = await this.get(id);
      const content = doc ? structuredClone(doc.content) : null;
      const result = await change(content);
      const next = result === undefined ? content : result;
      try {
        return await this.put(id, next, { ...(doc ? { base: doc.vector } : {}), ...(opts.fence ? { fence: opts.fence } : {}) });
      } catch (error) {
        if (error instanceof FencedError || !(error instanceof ConflictError)) throw error;
        last = error;
        await sleep(backoff.next());
      }
    }
    throw last ?? new ConflictError(`context document ${id}: no attempt made`);
  }

  /**
   * The document's changes after `afterRevision`, as they happen (first its
   * current state when newer); resumes after a disconnect from the last
   * revision seen. Abort `signal` to stop.
   */
  async *watch(id: string, afterRevision = 0, signal?: AbortSignal): AsyncGenerator<Change> {
    const backoff = new Backoff();
    let after = afterRevision;
    for (;;) {
      try {
        const stream = this.rpc.watchContext(
          { documentId: id, afterRevision: BigInt(after) },
          signal ? { signal } : {},
        );
        for await (const raw of stream) {
          after = Number(raw.revision);
          backoff.reset();
          yield {
            revision: after,
            vector: vectorFrom(raw.vector?.counters),
            deleted: raw.deleted,
            content: fromJsonBytes(raw.contentJson),
          };
        }
        return;
      } catch (error) {
        if (signal?.aborted) return;
        if (
          !(error instanceof ConnectError) ||
          (error.code !== Code.Unavailable && error.code !== Code.ResourceExhausted)
        ) {
          throw fromConnectError(error);
        }
      }
      await sleep(backoff.next(), signal);
    }
  }
}
