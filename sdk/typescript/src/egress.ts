/**
 * The agent's outbound calls through its sidecar's egress listener.
 *
 * The sidecar routes `<STATEFABRIC_EGRESS_ADDRESS>/<upstream>/<path>` to the
 * Upstream of that name, adding its credentials (the agent holds none), with
 * timeouts, retries and circuit breaking — and replay: a call carrying a
 * saga task key is recorded, and the same call under the same key (the task
 * handed to another worker after this one crashed) is answered from the
 * record without reaching the upstream.
 *
 * While a worker's handler runs, {@link taskHeaders} gives the key for the
 * next call — the task's key and the call's number within the attempt
 * (`<task key>/call-<n>`) — so a deterministic handler run again makes the
 * same keyed calls in the same order. {@link fetch} sets it on every
 * request; hand it to the `openai` package:
 *
 * ```ts
 * new OpenAI({ baseURL: egress.baseUrl("openai"), apiKey: "unused", fetch: egress.fetch });
 * ```
 */
import { AsyncLocalStorage } from "node:async_hooks";

export const TASK_KEY_HEADER = "x-statefabric-task-key";
export const REPLAYED_HEADER = "x-statefabric-replayed";
export const ERROR_HEADER = "x-statefabric-egress-error";
const DEFAULT_ADDRESS = "http://127.0.0.1:7480";

interface TaskCalls {
  key: string;
  traceparent: string;
  next: number;
}

const current = new AsyncLocalStorage<TaskCalls>();

/** Runs `work` as working on the task `key`, in the saga's trace `traceparent` (the worker does this around every handler). */
export function withTask<T>(key: string, work: () => T, traceparent = ""): T {
  return current.run({ key, traceparent, next: 1 }, work);
}

export function currentTaskKey(): string | undefined {
  return current.getStore()?.key;
}

/**
 * The headers for the next outbound call: the task key and the saga's trace
 * context (the agent's own `traceparent`, when it sets one, wins); empty
 * outside a task handler.
 */
export function taskHeaders(): Record<string, string> {
  const calls = current.getStore();
  if (!calls) return {};
  const n = calls.next++;
  const headers: Record<string, string> = { [TASK_KEY_HEADER]: `${calls.key}/call-${n}` };
  if (calls.traceparent) headers.traceparent = calls.traceparent;
  return headers;
}

/** The URL an HTTP client uses for `upstream` through the sidecar. */
export function baseUrl(upstream: string, address?: string): string {
  let base = address ?? process.env.STATEFABRIC_EGRESS_ADDRESS ?? DEFAULT_ADDRESS;
  if (!/^https?:\/\//.test(base)) base = `http://${base}`;
  return `${base.replace(/\/+$/, "")}/${upstream}`;
}

/** `fetch` that sets the task key on requests made inside a task handler. */
export const fetch: typeof globalThis.fetch = (input, init) => {
  const extra = taskHeaders();
  if (Object.keys(extra).length === 0) return globalThis.fetch(input, init);
  const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
  for (const [name, value] of Object.entries(extra)) if (!headers.has(name)) headers.set(name, value);
  return globalThis.fetch(input, { ...init, headers });
};
