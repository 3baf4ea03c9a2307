/**
 * Session state: small values per conversation or task that expire by
 * their namespace's absolute or sliding TTL (declared in the sidecar's
 * config).
 */
import type { Client as RpcClient } from "@connectrpc/connect";
import { Sessions as SessionsService } from "./gen/statefabric/state/v1/sessions_pb.js";
import { NotFoundError } from "./errors.js";
import { type CallSettings, encoder, options, unary } from "./rpc.js";

export interface Session {
  value: Uint8Array;
  expiresInMs: number;
}

export class Sessions {
  constructor(
    private readonly rpc: RpcClient<typeof SessionsService>,
    private readonly timeoutMs: number,
  ) {}

  /** Writes the session; returns the milliseconds until it expires. */
  async put(
    namespace: string,
    id: string,
    value: Uint8Array | string,
    opts: { ttlMs?: number } & CallSettings = {},
  ): Promise<number> {
    const r = await unary(
      this.rpc.putSession(
        {
          namespace,
          id,
          value: typeof value === "string" ? encoder.encode(value) : value,
          ...(opts.ttlMs !== undefined ? { ttlMs: BigInt(Math.round(opts.ttlMs)) } : {}),
        },
        options(this.timeoutMs, opts),
      ),
    );
    return Number(r.expiresInMs);
  }

  /** The session, or undefined when absent or expired (extends a sliding one). */
  async get(namespace: string, id: string, settings?: CallSettings): Promise<Session | undefined> {
    try {
      const r = await unary(this.rpc.getSession({ namespace, id }, options(this.timeoutMs, settings)));
      return { value: r.value, expiresInMs: Number(r.expiresInMs) };
    } catch (error) {
      if (error instanceof NotFoundError) return undefined;
      throw error;
    }
  }

  /**
   * Many sessions of one namespace in one call (at most 1,000 ids): the live
   * ones by id, in the order asked; absent and expired ones are left out.
   * Sliding ones are extended by the read.
   */
  async getMany(namespace: string, ids: readonly string[], settings?: CallSettings): Promise<Map<string, Session>> {
    const r = await unary(this.rpc.getSessions({ namespace, ids: [...ids] }, options(this.timeoutMs, settings)));
    return new Map(r.sessions.map((s) => [s.id, { value: s.value, expiresInMs: Number(s.expiresInMs) }]));
  }

  /** False when there was nothing (left) to delete. */
  async delete(namespace: string, id: string, settings?: CallSettings): Promise<boolean> {
    const r = await unary(this.rpc.deleteSession({ namespace, id }, options(this.timeoutMs, settings)));
    return r.existed;
  }
}
