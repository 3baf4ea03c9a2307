/**
 * Locks with leases and fencing tokens, renewed in the background.
 *
 * `await locks.withLock("repo", { ttlMs: 10_000 }, async (lock, signal) => …)`
 * takes the lock, renews it every third of its lease while the function
 * runs, and releases it at the end. If the lock is lost — a renewal refused
 * because someone else holds it now, or the lease running out before a
 * renewal got through (the process was paused, the sidecar unreachable) —
 * `signal` aborts at once (pass it on to fetch, timers, child work) and
 * `withLock` rejects with {@link LockLostError}. Guarded writes pass
 * `fence: lock`: once a newer holder has written they are refused with
 * `FencedError`, even if the old holder did not notice its loss in time.
 * A lease alone cannot give that guarantee.
 */
import type { Client as RpcClient } from "@connectrpc/connect";
import type { Fence as FenceMessage } from "./gen/statefabric/state/v1/events_pb.js";
import { Locks as LocksService, type Lease } from "./gen/statefabric/state/v1/locks_pb.js";
import { Code } from "@connectrpc/connect";
import { LockLostError, LockNotAcquiredError, StatefabricError } from "./errors.js";
import { type CallSettings, options, sleep, unary } from "./rpc.js";

/** A lock's name and the token of one grant of it. */
export interface Fence {
  lock: string;
  token: bigint;
}

/** The wire form of a write's guard. */
export function fenceOf(guard: Fence | HeldLock | undefined): { lock: string; token: bigint } | undefined {
  if (guard === undefined) return undefined;
  const fence = guard instanceof HeldLock ? guard.fence : guard;
  return { lock: fence.lock, token: fence.token } satisfies Partial<FenceMessage>;
}

export interface LockHolder {
  owner: string;
  token: bigint;
  expiresInMs: number;
}

export interface LockOptions {
  /** Lease length in milliseconds (10 s by default). */
  ttlMs?: number;
  /** How long to wait for the holder to let go (0: try once). */
  waitMs?: number;
}

/** A lock this process holds. Release it, or use `await using`. */
export class HeldLock {
  readonly name: string;
  readonly token: bigint;
  private readonly lostController = new AbortController();
  private readonly stopRenewal = new AbortController();
  private released = false;

  constructor(
    private readonly rpc: RpcClient<typeof LocksService>,
    lease: Lease,
    private readonly ttlMs: number,
    private readonly timeoutMs: number,
  ) {
    this.name = lease.name;
    this.token = lease.token;
    void this.renew(Date.now());
  }

  /** The fencing token to pass with guarded writes (`fence: lock`). */
  get fence(): Fence {
    return { lock: this.name, token: this.token };
  }

  /** Aborts the moment the lock is lost. */
  get signal(): AbortSignal {
    return this.lostController.signal;
  }

  get lost(): boolean {
    return this.lostController.signal.aborted;
  }

  private async renew(grantedAt: number): Promise<void> {
    let expires = grantedAt + this.ttlMs;
    const stop = this.stopRenewal.signal;
    while (!stop.aborted) {
      await sleep(this.ttlMs / 3, stop);
      if (stop.aborted) return;
      // Paused past the lease: someone else may hold it now.
      if (Date.now() >= expires) break;
      const sent = Date.now();
      try {
        await unary(
          this.rpc.renew(
            { name: this.name, token: this.token, ttlMs: this.ttlMs },
            { timeoutMs: Math.max(50, expires - sent), signal: stop },
          ),
        );
        expires = sent + this.ttlMs;
      } catch (error) {
        if (stop.aborted) return;
        if (error instanceof StatefabricError && error.code === Code.FailedPrecondition) break;
        // Transient: keep trying while the lease may still be ours.
      }
    }
    this.lostController.abort(
      new LockLostError(`lock ${this.name} (token ${this.token}) was lost while held`),
    );
  }

  /** Stops renewing and lets go; releasing a lost lock does nothing. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    this.stopRenewal.abort();
    if (this.lost) return;
    try {
      await unary(
        this.rpc.release({ name: this.name, token: this.token }, { timeoutMs: this.timeoutMs }),
      );
    } catch (error) {
      if (!(error instanceof StatefabricError && error.code === Code.FailedPrecondition)) throw error;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}

/** The `Locks` service. */
export class Locks {
  constructor(
    private readonly rpc: RpcClient<typeof LocksService>,
    private readonly timeoutMs: number,
  ) {}

  /** Takes `name`; undefined when it stayed taken. The lock renews itself until released. */
  async acquire(name: string, opts: LockOptions = {}): Promise<HeldLock | undefined> {
    const ttlMs = opts.ttlMs ?? 10_000;
    const waitMs = opts.waitMs ?? 0;
    const r = await unary(
      this.rpc.acquire({ name, ttlMs, waitMs }, options(this.timeoutMs + waitMs, undefined)),
    );
    if (!r.acquired || !r.lease) return undefined;
    return new HeldLock(this.rpc, r.lease, ttlMs, this.timeoutMs);
  }

  /**
   * Runs `work` holding `name` (see the module doc): rejects with
   * LockNotAcquiredError when it stayed taken, LockLostError when it was
   * lost while `work` ran.
   */
  async withLock<T>(
    name: string,
    opts: LockOptions,
    work: (lock: HeldLock, signal: AbortSignal) => Promise<T>,
  ): Promise<T> {
    const lock = await this.acquire(name, opts);
    if (!lock) throw new LockNotAcquiredError(`lock ${name} stayed taken for ${opts.waitMs ?? 0} ms`);
    try {
      const lost = new Promise<never>((_, reject) => {
        lock.signal.addEventListener("abort", () => reject(lock.signal.reason), { once: true });
      });
      lost.catch(() => undefined);
      const result = await Promise.race([work(lock, lock.signal), lost]);
      if (lock.lost) throw lock.signal.reason;
      return result;
    } catch (error) {
      if (lock.lost) throw lock.signal.reason;
      throw error;
    } finally {
      await lock.release();
    }
  }

  async inspect(name: string, settings?: CallSettings): Promise<LockHolder | undefined> {
    const r = await unary(this.rpc.inspect({ name }, options(this.timeoutMs, settings)));
    return r.held ? { owner: r.owner, token: r.token, expiresInMs: r.expiresInMs } : undefined;
  }
}
