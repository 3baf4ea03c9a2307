/**
 * Event streams: append with an expected version (and an idempotency key or
 * a lock's fence), read back, and follow the tenant's feed.
 *
 * A subscription resumes by itself: when the connection drops (the sidecar
 * restarted) or the sidecar cuts a slow consumer off (RESOURCE_EXHAUSTED),
 * it subscribes again after the checkpoint of the last event it handed out,
 * so the caller sees every event once, in commit order, without gaps.
 */
import { Code, ConnectError, type Client as RpcClient } from "@connectrpc/connect";
import { Events as EventsService, type RecordedEvent } from "./gen/statefabric/state/v1/events_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { ExpectedVersionSchema } from "./gen/statefabric/state/v1/events_pb.js";
import { InvalidArgumentError, fromConnectError } from "./errors.js";
import { type Fence, type HeldLock, fenceOf } from "./locks.js";
import { Backoff, type CallSettings, fromJsonBytes, options, sleep, toJsonBytes, unary, encoder } from "./rpc.js";

/** A place in the commit-ordered feed; opaque, pass back what an event carried. */
export interface Checkpoint {
  commit: bigint;
  position: bigint;
}

/** What the writer believes about the stream before appending. */
export type Expected = "any" | "noStream" | "streamExists" | { exact: number };

function expectedToWire(expected: Expected): MessageInitShape<typeof ExpectedVersionSchema> {
  if (typeof expected === "object") {
    if (!Number.isInteger(expected.exact) || expected.exact < 1) {
      throw new InvalidArgumentError("an exact expected version is 1 or more", undefined, "expected");
    }
    return { kind: { case: "exact", value: BigInt(expected.exact) } };
  }
  switch (expected) {
    case "noStream":
      return { kind: { case: "noStream", value: {} } };
    case "streamExists":
      return { kind: { case: "streamExists", value: {} } };
    default:
      return { kind: { case: "any", value: {} } };
  }
}

/** An event to append; `data` is anything JSON-serialisable. */
export interface NewEvent {
  type: string;
  data: unknown;
  /** A UUID; the sidecar makes one when absent. */
  id?: string;
  schemaVersion?: number;
  correlationId?: string;
  causationId?: string;
  traceparent?: string;
  extra?: Record<string, unknown>;
}

export interface Event {
  id: string;
  streamId: string;
  streamType: string;
  type: string;
  schemaVersion: number;
  data: unknown;
  streamVersion: number;
  globalPosition: bigint;
  checkpoint: Checkpoint;
  createdAt: string;
  correlationId: string;
  causationId: string;
  traceparent: string;
  vectorClock: Record<string, number>;
  extra: Record<string, unknown> | null;
}

export interface Appended {
  firstVersion: number;
  lastVersion: number;
  firstPosition: bigint;
  lastPosition: bigint;
  /** True when an idempotency key matched: nothing new was written. */
  replayed: boolean;
}

export interface AppendOptions extends CallSettings {
  expected?: Expected;
  idempotencyKey?: string;
  /** A held lock (or its fence): refused once a newer holder of the lock wrote. */
  fence?: Fence | HeldLock;
}

function fromWire(raw: RecordedEvent): Event {
  const meta = raw.metadata;
  return {
    id: raw.id,
    streamId: raw.streamId,
    streamType: raw.streamType,
    type: raw.eventType,
    schemaVersion: raw.schemaVersion,
    data: fromJsonBytes(raw.dataJson),
    streamVersion: Number(raw.streamVersion),
    globalPosition: raw.globalPosition,
    checkpoint: { commit: raw.checkpoint?.commit ?? 0n, position: raw.checkpoint?.position ?? 0n },
    createdAt: raw.createdAt,
    correlationId: meta?.correlationId ?? "",
    causationId: meta?.causationId ?? "",
    traceparent: meta?.traceparent ?? "",
    vectorClock: Object.fromEntries(Object.entries(meta?.vectorClock ?? {}).map(([k, v]) => [k, Number(v)])),
    extra: meta?.extraJson.length ? (fromJsonBytes(meta.extraJson) as Record<string, unknown>) : null,
  };
}

// Statuses after which a subscription subscribes again: the sidecar went
// away or restarted, or cut this consumer off for falling behind.
const RESUMABLE = new Set([Code.Unavailable, Code.ResourceExhausted, Code.Internal, Code.Unknown]);

/**
 * An async iterable over a feed's events that resumes after disconnects.
 * `checkpoint` is the last event handed out (persist it to resume across
 * restarts of the agent); `resumes` counts how often it subscribed again.
 */
export class Subscription implements AsyncIterable<Event> {
  resumes = 0;
  private readonly backoff: Backoff;

  constructor(
    private readonly rpc: RpcClient<typeof EventsService>,
    public checkpoint: Checkpoint | undefined,
    private readonly streamId: string | undefined,
    private readonly signal: AbortSignal | undefined,
    maxBackoffMs: number,
  ) {
    this.backoff = new Backoff(50, maxBackoffMs);
  }

  private open(): AsyncIterable<RecordedEvent> {
    const after = this.checkpoint ? { ...this.checkpoint } : undefined;
    const opts = this.signal ? { signal: this.signal } : {};
    return this.streamId === undefined
      ? this.rpc.subscribeAll({ after }, opts)
      : this.rpc.subscribeStream({ streamId: this.streamId, after }, opts);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Event> {
    for (;;) {
      try {
        for await (const raw of this.open()) {
          const event = fromWire(raw);
          this.checkpoint = event.checkpoint;
          this.backoff.reset();
          yield event;
        }
        return;
      } catch (error) {
        if (this.signal?.aborted) return;
        if (!(error instanceof ConnectError) || !RESUMABLE.has(error.code)) throw fromConnectError(error);
      }
      this.resumes += 1;
      await sleep(this.backoff.next(), this.signal);
    }
  }
}

/** The `Events` service. */
export class Events {
  constructor(
    private readonly rpc: RpcClient<typeof EventsService>,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Appends `events` to one stream atomically if `expected` holds (else
   * ConflictError). With `idempotencyKey`, at most once: a repeat returns the
   * first result with `replayed` set.
   */
  async append(
    streamId: string,
    streamType: string,
    events: NewEvent[],
    opts: AppendOptions = {},
  ): Promise<Appended> {
    if (events.length === 0) throw new InvalidArgumentError("append at least one event", undefined, "events");
    const request = {
      streamId,
      streamType,
      expected: expectedToWire(opts.expected ?? "any"),
      events: events.map((e) => ({
        id: e.id ?? "",
        eventType: e.type,
        schemaVersion: e.schemaVersion ?? 1,
        dataJson: toJsonBytes(e.data),
        metadata: {
          correlationId: e.correlationId ?? "",
          causationId: e.causationId ?? "",
          traceparent: e.traceparent ?? "",
          extraJson: e.extra ? encoder.encode(JSON.stringify(e.extra)) : new Uint8Array(),
        },
      })),
      fence: fenceOf(opts.fence),
    };
    const r = await unary(this.rpc.appendEvents(request, options(this.timeoutMs, opts, opts.idempotencyKey)));
    return {
      firstVersion: Number(r.firstVersion),
      lastVersion: Number(r.lastVersion),
      firstPosition: r.firstPosition,
      lastPosition: r.lastPosition,
      replayed: r.replayed,
    };
  }

  async readStream(streamId: string, fromVersion = 1, limit = 100, settings?: CallSettings): Promise<Event[]> {
    const r = await unary(
      this.rpc.readStream({ streamId, fromVersion: BigInt(fromVersion), limit }, options(this.timeoutMs, settings)),
    );
    return r.events.map(fromWire);
  }

  async readAll(fromPosition: bigint = 1n, limit = 100, settings?: CallSettings): Promise<Event[]> {
    const r = await unary(this.rpc.readAll({ fromPosition, limit }, options(this.timeoutMs, settings)));
    return r.events.map(fromWire);
  }

  /**
   * The tenant's events (or one stream's) after `after` (from the beginning
   * when absent), live, resuming by itself; iterate with `for await`. Abort
   * `signal` to stop.
   */
  subscribe(
    opts: { after?: Checkpoint; streamId?: string; signal?: AbortSignal; maxBackoffMs?: number } = {},
  ): Subscription {
    return new Subscription(this.rpc, opts.after, opts.streamId, opts.signal, opts.maxBackoffMs ?? 2000);
  }
}
