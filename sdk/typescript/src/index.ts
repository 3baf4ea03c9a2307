/**
 * The TypeScript client for a Statefabric sidecar.
 *
 * - `client.events` — append with expected version, idempotency key or
 *   fence; reads; subscriptions that resume by themselves.
 * - `client.context` — documents with version vectors, deltas on local
 *   copies, CRDTs, `update` retried on conflict, watches.
 * - `client.locks` — `withLock`: renewed in the background, an AbortSignal
 *   that fires when lost, fencing tokens.
 * - `client.sessions` — values with absolute or sliding TTLs.
 * - `client.tasks` — start sagas; workers with heartbeats.
 * - `egress` — outbound calls through the sidecar, keyed for replay.
 */
export { Client, type ClientOptions, baseUrlOf } from "./client.js";
export * from "./errors.js";
export { type Appended, type AppendOptions, type Checkpoint, type Event, type Expected, Events, type NewEvent, Subscription } from "./events.js";
export { applyDelta, type Change, Context, Crdt, type Document, MergeType, type Vector, type Written, type WriteOptions } from "./context.js";
export { type Fence, HeldLock, type LockHolder, type LockOptions, Locks } from "./locks.js";
export { type Session, Sessions } from "./sessions.js";
export { type Handler, type Task, TaskFailed, Tasks, Worker, type WorkerOptions } from "./tasks.js";
export * as egress from "./egress.js";
