/**
 * Typed errors: every status the sidecar returns becomes one of these, in
 * one place ({@link fromConnectError}), so callers act on a type instead of
 * parsing messages. The sidecar's message says what was wrong and names the
 * offending field or value; it is kept whole in `message`.
 */
import { Code, ConnectError } from "@connectrpc/connect";

export class StatefabricError extends Error {
  constructor(
    message: string,
    /** The gRPC status code, when the sidecar refused the call. */
    readonly code?: Code,
  ) {
    super(message);
    // Each subclass is named after itself ("FencedError", …) in stack traces.
    this.name = new.target.name;
  }
  /** Whether the same call later may succeed. */
  get transient(): boolean {
    return false;
  }
}

/**
 * The write's expectation was stale (FAILED_PRECONDITION): a stream's
 * expected version or a document's version vector. Nothing was written.
 */
export class ConflictError extends StatefabricError {
  /** The document's version vector now, when the message names it. */
  get currentVector(): Record<string, number> | undefined {
    const match = /version vector is now (\{.*\})/.exec(this.message);
    if (!match?.[1]) return undefined;
    try {
      const parsed: unknown = JSON.parse(match[1]);
      if (parsed === null || typeof parsed !== "object") return undefined;
      return Object.fromEntries(Object.entries(parsed).map(([k, v]) => [k, Number(v)]));
    } catch {
      return undefined;
    }
  }
  /** The stream's version now (undefined when the message says it is absent). */
  get actualVersion(): number | undefined {
    const match = /but the stream is at version (\d+)/.exec(this.message);
    return match?.[1] ? Number(match[1]) : undefined;
  }
}

/** The write carried a stale fencing token: someone else holds (or held) the lock since. */
export class FencedError extends ConflictError {}

/** The task attempt is over (answered, timed out or cancelled): stop working on it. */
export class AttemptOverError extends ConflictError {}

/** A held lock was lost; work guarded by it must stop. */
export class LockLostError extends StatefabricError {}

/** The lock stayed taken for the whole wait. */
export class LockNotAcquiredError extends StatefabricError {}

/**
 * INVALID_ARGUMENT: the message names the field; `field` is set when this
 * SDK refused the input itself.
 */
export class InvalidArgumentError extends StatefabricError {
  constructor(
    message: string,
    code?: Code,
    readonly field?: string,
  ) {
    super(message, code);
  }
}

/** ALREADY_EXISTS: e.g. a saga id in use. */
export class AlreadyExistsError extends InvalidArgumentError {}

/** The idempotency key was already used for a different request. */
export class IdempotencyKeyReusedError extends InvalidArgumentError {}

export class NotFoundError extends StatefabricError {}

/** RESOURCE_EXHAUSTED: over a size or count limit. */
export class TooLargeError extends StatefabricError {}

/** OUT_OF_RANGE: a counter would leave the signed 64-bit range; nothing was written. */
export class OutOfRangeError extends StatefabricError {}

export class PermissionDeniedError extends StatefabricError {}

/** Transient: UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED. Retrying later may succeed. */
export class UnavailableError extends StatefabricError {
  override get transient(): boolean {
    return true;
  }
}

type ErrorClass = new (message: string, code?: Code) => StatefabricError;

const BY_CODE = new Map<Code, ErrorClass>([
  [Code.FailedPrecondition, ConflictError],
  [Code.InvalidArgument, InvalidArgumentError],
  [Code.AlreadyExists, AlreadyExistsError],
  [Code.NotFound, NotFoundError],
  [Code.ResourceExhausted, TooLargeError],
  [Code.OutOfRange, OutOfRangeError],
  [Code.PermissionDenied, PermissionDeniedError],
  [Code.Unauthenticated, PermissionDeniedError],
  [Code.Unavailable, UnavailableError],
  [Code.DeadlineExceeded, UnavailableError],
  [Code.Aborted, UnavailableError],
]);

/** The typed error for a failed call (anything else passes through). */
export function fromConnectError(error: unknown): unknown {
  if (!(error instanceof ConnectError)) return error;
  const message = error.rawMessage || Code[error.code];
  let kind: ErrorClass = BY_CODE.get(error.code) ?? StatefabricError;
  if (kind === ConflictError) {
    if (message.includes("fencing token")) kind = FencedError;
    else if (message.includes("no longer current")) kind = AttemptOverError;
  } else if (kind === InvalidArgumentError && message.includes("idempotency key") && message.includes("already used")) {
    kind = IdempotencyKeyReusedError;
  }
  return new kind(message, error.code);
}
