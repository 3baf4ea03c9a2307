/**
 * Real sidecars for the SDK's tests: `fabric dev` (SQLite, embedded saga
 * engine) and `statefabric-sidecar` on the test Postgres with its locks,
 * sessions and change updates on the test Redis — the binaries the
 * workspace built (STATEFABRIC_BIN_DIR, default $CARGO_TARGET_DIR/debug),
 * the services `testenv/up.sh` started (its env.sh exports where).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createNetServer } from "node:net";
import { createServer, type Server } from "node:http";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";

export function binDir(): string {
  if (process.env.STATEFABRIC_BIN_DIR) return process.env.STATEFABRIC_BIN_DIR;
  const target = process.env.CARGO_TARGET_DIR ?? join(homedir(), ".cache/statefabric/target");
  return join(target, "debug");
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createNetServer();
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))));
    });
  });
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: source the env.sh that testenv/up.sh writes`);
  return value;
}

export function unique(prefix: string): string {
  return `${prefix}-${randomUUID().replaceAll("-", "").slice(0, 10)}`;
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A running sidecar process. */
export class Sidecar {
  process: ChildProcess | undefined;
  log = "";
  egress = "";

  private constructor(
    readonly binary: string,
    readonly env: Record<string, string>,
    readonly grpcPort: number,
    readonly adminPort: number,
  ) {}

  static async create(binary: string, env: Record<string, string>): Promise<Sidecar> {
    return new Sidecar(binary, env, await freePort(), await freePort());
  }

  get address(): string {
    return `127.0.0.1:${this.grpcPort}`;
  }

  async start(): Promise<this> {
    const path = join(binDir(), this.binary);
    if (!existsSync(path)) throw new Error(`${path} is missing: run \`cargo build --workspace --bins\` first`);
    this.log = join(mkdtempSync(join(tmpdir(), "statefabric-ts-")), `${this.binary}.log`);
    const stderr = openSync(this.log, "w");
    this.process = spawn(path, this.binary === "fabric" ? ["dev"] : [], {
      env: {
        ...process.env,
        STATEFABRIC_SIDECAR__LISTEN: this.address,
        STATEFABRIC_ADMIN__LISTEN: `127.0.0.1:${this.adminPort}`,
        STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE: "5s",
        ...this.env,
      },
      stdio: ["ignore", "ignore", stderr],
    });
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (this.process.exitCode !== null) throw new Error(`${this.binary} exited:\n${this.stderr()}`);
      try {
        const response = await fetch(`http://127.0.0.1:${this.adminPort}/healthz/ready`);
        if (response.status === 200) return this;
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error(`${this.binary} not ready within 30 s:\n${this.stderr()}`);
  }

  stderr(): string {
    return this.log ? readFileSync(this.log, "utf8").slice(-20_000) : "";
  }

  async stop(): Promise<void> {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }

  /** Stops it and starts it again on the same ports and storage. */
  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }
}

export async function devSidecar(extra: Record<string, string> = {}): Promise<Sidecar> {
  const db = join(mkdtempSync(join(tmpdir(), "statefabric-dev-")), "events.db");
  return Sidecar.create("fabric", {
    STATEFABRIC_STORAGE__SQLITE__PATH: db,
    STATEFABRIC_SAGAS__SQLITE_PATH: db,
    STATEFABRIC_API__LISTEN: `127.0.0.1:${await freePort()}`,
    STATEFABRIC_API__GRPC_LISTEN: `127.0.0.1:${await freePort()}`,
    ...extra,
  });
}

export async function postgresSidecar(tenant = unique("ts"), identity = "ts-agent"): Promise<Sidecar> {
  return Sidecar.create("statefabric-sidecar", {
    STATEFABRIC_SIDECAR__TENANT: tenant,
    STATEFABRIC_SIDECAR__IDENTITY: identity,
    STATEFABRIC_STORAGE__BACKEND: "postgres",
    STATEFABRIC_STORAGE__POSTGRES__URL: required("STATEFABRIC_TEST_PG_APP_URL"),
    STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL: required("STATEFABRIC_TEST_PG_ADMIN_URL"),
    STATEFABRIC_REDIS__MODE: "standalone",
    STATEFABRIC_REDIS__URLS: required("STATEFABRIC_TEST_REDIS_URL"),
    STATEFABRIC_LOCKS__BACKEND: "redis",
    STATEFABRIC_SESSIONS__BACKEND: "redis",
    STATEFABRIC_UPDATES__BACKEND: "redis",
  });
}

/** A real HTTP server standing in for a model API, counting its calls. */
export class ModelUpstream {
  private constructor(
    private readonly server: Server,
    readonly port: number,
    readonly calls: {
      authorization: string | undefined;
      taskKey: string | undefined;
      traceparent: string | undefined;
      body: any;
    }[],
  ) {}

  static async start(): Promise<ModelUpstream> {
    const calls: ModelUpstream["calls"] = [];
    const server = createServer((req, res) => {
      let raw = "";
      req.on("data", (chunk) => (raw += chunk));
      req.on("end", () => {
        const body = raw ? JSON.parse(raw) : {};
        calls.push({
          authorization: req.headers.authorization,
          taskKey: req.headers["x-statefabric-task-key"] as string | undefined,
          traceparent: req.headers.traceparent as string | undefined,
          body,
        });
        const prompt = body.messages?.at(-1)?.content ?? "";
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ choices: [{ message: { content: `answer #${calls.length} to ${prompt}` } }] }));
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    return new ModelUpstream(server, typeof address === "object" && address ? address.port : 0, calls);
  }

  /** `fabric dev` with egress on and an Upstream `model` for this server, holding the key. */
  async devWithEgress(): Promise<Sidecar> {
    const mesh = join(mkdtempSync(join(tmpdir(), "statefabric-mesh-")), "mesh.yaml");
    writeFileSync(
      mesh,
      [
        "apiVersion: statefabric.io/v1alpha1",
        "kind: Upstream",
        "metadata: {name: model}",
        "spec:",
        `  url: http://127.0.0.1:${this.port}/v1`,
        "  headers: [{name: Authorization, value: Bearer sk-held-by-the-sidecar}]",
        "",
      ].join("\n"),
    );
    const listen = `127.0.0.1:${await freePort()}`;
    const sidecar = await devSidecar({
      STATEFABRIC_MESH__FILES: JSON.stringify([mesh]),
      STATEFABRIC_EGRESS__ENABLED: "true",
      STATEFABRIC_EGRESS__LISTEN: listen,
    });
    sidecar.egress = `http://${listen}`;
    return sidecar;
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
