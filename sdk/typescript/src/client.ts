/**
 * A connection to the sidecar in the agent's pod.
 *
 * The address comes from the argument, else `STATEFABRIC_ADDRESS` (which
 * the injector sets in every app container), else `127.0.0.1:7400`. Every
 * call has a deadline: the client's `timeoutMs` unless the call says
 * otherwise (long polls add their wait to it).
 */
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { SharedContext } from "./gen/statefabric/state/v1/context_pb.js";
import { Events as EventsService } from "./gen/statefabric/state/v1/events_pb.js";
import { Locks as LocksService } from "./gen/statefabric/state/v1/locks_pb.js";
import { Sessions as SessionsService } from "./gen/statefabric/state/v1/sessions_pb.js";
import { Tasks as TasksService } from "./gen/statefabric/state/v1/tasks_pb.js";
import { Context } from "./context.js";
import { Events } from "./events.js";
import { Locks } from "./locks.js";
import { Sessions } from "./sessions.js";
import { Tasks } from "./tasks.js";

export const DEFAULT_ADDRESS = "127.0.0.1:7400";

/** The base URL for `address` (`http://host:port` or `host:port`). */
export function baseUrlOf(address?: string): string {
  const chosen = address ?? process.env.STATEFABRIC_ADDRESS ?? DEFAULT_ADDRESS;
  if (chosen.startsWith("https://")) {
    throw new Error(`${chosen}: the sidecar listens in plaintext on the pod's loopback; use http://`);
  }
  return chosen.startsWith("http://") ? chosen.replace(/\/+$/, "") : `http://${chosen}`;
}

export interface ClientOptions {
  /** Default deadline of every call, in milliseconds (10 s). */
  timeoutMs?: number;
}

/** The sidecar's APIs over one HTTP/2 connection: events, context, locks, sessions, tasks. */
export class Client {
  readonly baseUrl: string;
  readonly events: Events;
  readonly context: Context;
  readonly locks: Locks;
  readonly sessions: Sessions;
  readonly tasks: Tasks;

  constructor(address?: string, opts: ClientOptions = {}) {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    if (!(timeoutMs > 0)) throw new Error("timeoutMs must be positive");
    this.baseUrl = baseUrlOf(address);
    // gRPC over HTTP/2 without TLS (prior knowledge), as the sidecar serves it.
    const transport = createGrpcTransport({ baseUrl: this.baseUrl, readMaxBytes: 64 * 1024 * 1024 });
    this.events = new Events(createClient(EventsService, transport), timeoutMs);
    this.context = new Context(createClient(SharedContext, transport), timeoutMs);
    this.locks = new Locks(createClient(LocksService, transport), timeoutMs);
    this.sessions = new Sessions(createClient(SessionsService, transport), timeoutMs);
    this.tasks = new Tasks(createClient(TasksService, transport), timeoutMs);
  }
}
