/**
 * Sagas from an agent's side: start sagas, and take and answer the tasks the
 * saga engine dispatches to an agent type.
 *
 * {@link Tasks.worker} is the loop most agents want:
 *
 * ```ts
 * const worker = client.tasks.worker("planner", async (task) => ({ steps: [] }), { concurrency: 4 });
 * const running = worker.run();
 * …
 * await worker.stop();
 * ```
 *
 * It streams the agent type's tasks, runs the handler for each (at most
 * `concurrency` at once), heartbeats while the handler runs so the lease
 * does not lapse, completes the task with what the handler returns or fails
 * it with what it throws, and sets the task key on the egress calls the
 * handler makes (`egress.fetch`). It reconnects when the sidecar goes away.
 * The handler gets an AbortSignal that aborts when the attempt is over
 * (timed out or cancelled) or the worker gives up waiting for it at stop.
 * Stopping lets running handlers finish (up to `drainTimeoutMs`), then
 * closes the stream: the sidecar offers every task it handed out and this
 * worker did not answer to another worker at once, under the same key — as
 * it does when a worker dies. A task's key is its idempotency key: a
 * handler must give a repeat of the same key no second effect.
 */
import { ConnectError, Code, type Client as RpcClient } from "@connectrpc/connect";
import { Tasks as TasksService, type Task as WireTask } from "./gen/statefabric/state/v1/tasks_pb.js";
import * as egress from "./egress.js";
import { AttemptOverError, InvalidArgumentError, StatefabricError, fromConnectError } from "./errors.js";
import { Backoff, type CallSettings, fromJsonBytes, options, sleep, toJsonBytes, unary } from "./rpc.js";

/** One attempt of a saga step (or of its compensation). */
export interface Task {
  /** The idempotency key: saga/step/visit/attempt[/undo]. */
  key: string;
  sagaId: string;
  step: string;
  visit: number;
  attempt: number;
  compensation: boolean;
  agentType: string;
  action: string;
  input: any;
  /** Milliseconds to answer or heartbeat within. */
  timeoutMs: number;
  /** The saga's W3C trace context ("" when none): the worker sends it with the task's heartbeats, answer and egress calls. */
  traceparent: string;
}

function fromWire(raw: WireTask): Task {
  return {
    key: raw.key,
    sagaId: raw.sagaId,
    step: raw.step,
    visit: raw.visit,
    attempt: raw.attempt,
    compensation: raw.compensation,
    agentType: raw.agentType,
    action: raw.action,
    input: fromJsonBytes(raw.inputJson),
    timeoutMs: Number(raw.timeoutMs),
    traceparent: raw.traceparent,
  };
}

/** Call options putting a call in the saga's trace (`traceparent`). */
function traced(timeoutMs: number, traceparent: string) {
  const opts = options(timeoutMs, undefined);
  return traceparent ? { ...opts, headers: { ...(opts.headers as Record<string, string>), traceparent } } : opts;
}

/** Throw from a handler to fail the task with this reason (any other error fails it too). */
export class TaskFailed extends Error {
  override name = "TaskFailed";
}

export type Handler = (task: Task, signal: AbortSignal) => unknown;

export interface WorkerOptions {
  /** At most this many tasks at once (4 by default; 1 to 1000). */
  concurrency?: number;
  /** Names the worker in the saga's history (the sidecar's identity by default). */
  name?: string;
  /** How long stop() waits for running handlers (30 s by default). */
  drainTimeoutMs?: number;
}

export class Tasks {
  constructor(
    private readonly rpc: RpcClient<typeof TasksService>,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Starts a saga of `definition` with `data` (a JSON object); returns its
   * id. With `traceparent` (W3C), the saga's tasks carry that trace context.
   */
  async startSaga(
    definition: string,
    data: Record<string, unknown> = {},
    opts: { sagaId?: string; traceparent?: string } & CallSettings = {},
  ): Promise<string> {
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new InvalidArgumentError("saga data must be a JSON object", undefined, "data");
    }
    const r = await unary(
      this.rpc.startSaga(
        { definition, sagaId: opts.sagaId ?? "", dataJson: toJsonBytes(data) },
        opts.traceparent ? traced(this.timeoutMs, opts.traceparent) : options(this.timeoutMs, opts),
      ),
    );
    return r.sagaId;
  }

  /** Up to `max` tasks, waiting up to `waitMs` for the first. */
  async poll(agentType: string, max = 1, waitMs = 0): Promise<Task[]> {
    const r = await unary(
      this.rpc.pollTasks({ agentType, max, waitMs }, options(this.timeoutMs + waitMs, undefined)),
    );
    return r.tasks.map(fromWire);
  }

  /** Pushes the deadline a full timeout ahead; AttemptOverError when the attempt is over. */
  async heartbeat(key: string, traceparent = ""): Promise<number> {
    const r = await unary(this.rpc.heartbeat({ key }, traced(this.timeoutMs, traceparent)));
    return Number(r.deadlineInMs);
  }

  /** Answers with `output` (JSON); repeating the same answer is accepted. */
  async complete(key: string, output: unknown = null, traceparent = ""): Promise<void> {
    await unary(this.rpc.completeTask({ key, outputJson: toJsonBytes(output) }, traced(this.timeoutMs, traceparent)));
  }

  /** Answers with a failure; the engine retries per the step's policy. */
  async fail(key: string, error: string, traceparent = ""): Promise<void> {
    await unary(this.rpc.failTask({ key, error }, traced(this.timeoutMs, traceparent)));
  }

  /** The raw task stream; {@link worker} is what most agents want. */
  stream(agentType: string, maxInFlight = 16, worker = "", signal?: AbortSignal): AsyncIterable<WireTask> {
    return this.rpc.streamTasks({ agentType, maxInFlight, worker }, signal ? { signal } : {});
  }

  worker(agentType: string, handler: Handler, opts: WorkerOptions = {}): Worker {
    const concurrency = opts.concurrency ?? 4;
    if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 1000) {
      throw new InvalidArgumentError("concurrency is 1 to 1000", undefined, "concurrency");
    }
    return new Worker(this, agentType, handler, concurrency, opts.name ?? "", opts.drainTimeoutMs ?? 30_000);
  }
}

export class Worker {
  /** Tasks answered by this worker (completed or failed). */
  answered = 0;
  private readonly stopping = new AbortController();
  private readonly running = new Map<string, { done: Promise<void>; abort: AbortController }>();
  private runner: Promise<void> | undefined;

  constructor(
    private readonly tasks: Tasks,
    readonly agentType: string,
    private readonly handler: Handler,
    private readonly concurrency: number,
    private readonly name: string,
    private readonly drainTimeoutMs: number,
  ) {}

  /**
   * Works until {@link stop}; rejects only for what reconnecting cannot fix
   * (an invalid agent type, a refused tenant).
   */
  run(): Promise<void> {
    this.runner ??= this.loop();
    return this.runner;
  }

  /** Stops taking tasks; resolves once running handlers are done (or aborted after the drain timeout). */
  async stop(): Promise<void> {
    this.stopping.abort();
    await this.runner;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  private async loop(): Promise<void> {
    const backoff = new Backoff(100, 5000);
    while (!this.stopping.signal.aborted) {
      // The stream is closed only after a drain, so the sidecar does not
      // offer running tasks to others while they finish here.
      const stream = new AbortController();
      try {
        await this.consume(this.tasks.stream(this.agentType, this.concurrency, this.name, stream.signal), backoff);
        await this.drain();
        stream.abort();
        return;
      } catch (error) {
        stream.abort();
        if (this.stopping.signal.aborted) break;
        const typed = fromConnectError(error);
        const code = error instanceof ConnectError ? error.code : undefined;
        const reconnect =
          (typed instanceof StatefabricError && typed.transient) ||
          code === Code.Internal ||
          code === Code.Unknown ||
          code === Code.Canceled ||
          (error as Error)?.message === "the task stream ended";
        if (!reconnect) throw typed;
        await sleep(backoff.next(), this.stopping.signal);
      }
    }
    await this.drain();
  }

  private async consume(stream: AsyncIterable<WireTask>, backoff: Backoff): Promise<void> {
    const iterator = stream[Symbol.asyncIterator]();
    const stopped = new Promise<"stop">((resolve) =>
      this.stopping.signal.addEventListener("abort", () => resolve("stop"), { once: true }),
    );
    for (;;) {
      const next = await Promise.race([iterator.next(), stopped]);
      if (next === "stop") return;
      if (next.done) throw new Error("the task stream ended");
      backoff.reset();
      const task = fromWire(next.value);
      // Handed out again after a reconnect while still running here.
      if (this.running.has(task.key)) continue;
      const abort = new AbortController();
      const done = this.runOne(task, abort).finally(() => this.running.delete(task.key));
      this.running.set(task.key, { done, abort });
    }
  }

  private async drain(): Promise<void> {
    const running = [...this.running.values()];
    if (running.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), this.drainTimeoutMs);
    });
    const outcome = await Promise.race([Promise.all(running.map((r) => r.done)), timeout]);
    clearTimeout(timer);
    if (outcome === "timeout") {
      for (const r of this.running.values()) r.abort.abort(new Error("the worker is stopping"));
      await Promise.all([...this.running.values()].map((r) => r.done));
    }
  }

  private async runOne(task: Task, abort: AbortController): Promise<void> {
    const work = egress.withTask(task.key, async () => this.handler(task, abort.signal), task.traceparent);
    let settled = false;
    const outcome = work.then(
      (output) => ({ ok: true as const, output }),
      (error: unknown) => ({ ok: false as const, error }),
    );
    void outcome.then(() => (settled = true));
    const everyMs = Math.max(50, task.timeoutMs / 3);
    const aborted = new Promise<"aborted">((resolve) =>
      abort.signal.addEventListener("abort", () => resolve("aborted"), { once: true }),
    );
    for (;;) {
      const tick = new Promise<"tick">((resolve) => setTimeout(() => resolve("tick"), everyMs).unref());
      const first = await Promise.race([outcome, tick, aborted]);
      if (first === "aborted") return; // stopping: left unanswered, released with the stream
      if (first !== "tick") break;
      if (settled) continue;
      try {
        await this.tasks.heartbeat(task.key, task.traceparent);
      } catch (error) {
        if (error instanceof AttemptOverError) {
          abort.abort(error);
          return;
        }
      }
    }
    const result = await outcome;
    if (abort.signal.aborted) return;
    try {
      if (result.ok) {
        JSON.stringify(result.output);
        await this.tasks.complete(task.key, result.output ?? null, task.traceparent);
      } else {
        const error = result.error;
        const reason =
          error instanceof TaskFailed
            ? error.message
            : error instanceof Error
              ? `${error.name}: ${error.message}`
              : String(error);
        await this.tasks.fail(task.key, reason || "the handler failed", task.traceparent);
      }
      this.answered += 1;
    } catch (error) {
      if (!(error instanceof AttemptOverError)) {
        console.warn(`statefabric: could not answer task ${task.key}: ${String(error)}`);
      }
    }
  }
}
