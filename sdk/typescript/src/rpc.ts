/**
 * The one place calls go out: a deadline on every call, the
 * idempotency-key header, and failures turned into typed errors.
 */
import type { CallOptions } from "@connectrpc/connect";
import { InvalidArgumentError, fromConnectError } from "./errors.js";

export const IDEMPOTENCY_KEY_HEADER = "idempotency-key";

/** Options every unary call of this SDK takes. */
export interface CallSettings {
  /** Milliseconds; the client's `timeoutMs` when absent. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export function options(
  defaultTimeoutMs: number,
  settings: CallSettings | undefined,
  idempotencyKey?: string,
): CallOptions {
  const headers: Record<string, string> = {};
  if (idempotencyKey !== undefined) {
    if (!idempotencyKey || !/^[\x20-\x7e]+$/.test(idempotencyKey)) {
      throw new InvalidArgumentError(
        "idempotencyKey must be non-empty printable ASCII",
        undefined,
        "idempotencyKey",
      );
    }
    headers[IDEMPOTENCY_KEY_HEADER] = idempotencyKey;
  }
  return {
    timeoutMs: settings?.timeoutMs ?? defaultTimeoutMs,
    headers,
    ...(settings?.signal ? { signal: settings.signal } : {}),
  };
}

/** Awaits a call; a refusal throws its typed error. */
export async function unary<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (error) {
    throw fromConnectError(error);
  }
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Exponential backoff with full jitter, for the loops that reconnect. */
export class Backoff {
  private attempt = 0;
  constructor(
    private readonly firstMs = 50,
    private readonly mostMs = 2000,
  ) {}
  next(): number {
    const ceiling = Math.min(this.mostMs, this.firstMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 16);
    return Math.random() * ceiling;
  }
  reset(): void {
    this.attempt = 0;
  }
}

export const encoder = new TextEncoder();
export const decoder = new TextDecoder();

export function toJsonBytes(value: unknown): Uint8Array {
  return encoder.encode(JSON.stringify(value === undefined ? null : value));
}

export function fromJsonBytes(bytes: Uint8Array): unknown {
  return bytes.length === 0 ? null : JSON.parse(decoder.decode(bytes));
}
