//! `fabric`: the Statefabric command line.
//!
//! Hosts the embedded all-in-one mode (`fabric dev`, [`dev`], with the
//! Planner/Coder/Critic [`demo`]) and the operator commands: sagas through
//! the control plane's API ([`sagas`]), dead letters and schemas on Kafka,
//! migrations and tenant onboarding ([`tenants`]).

mod demo;
mod dev;
mod sagas;
mod tenants;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use statefabric_runtime::ConfigArgs;

/// Statefabric: event-sourced state, locks, context and sagas for agent fleets.
#[derive(Debug, Parser)]
#[command(name = "fabric", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded all-in-one fabric in this process (no servers needed).
    ///
    /// The control plane (saga engine, operator API and saga page on
    /// 127.0.0.1:7502) and a sidecar (State API, gRPC on 127.0.0.1:7400) on
    /// the embedded SQLite store (./statefabric-data), admin endpoints on
    /// 127.0.0.1:7401.
    Dev {
        #[command(flatten)]
        config: ConfigArgs,
        /// Also run demo Planner, Coder and Critic agents on sample sagas,
        /// with a live progress view.
        #[arg(long)]
        demo: bool,
    },
    /// Sagas: list, show, start, pause, resume, retry, skip, compensate,
    /// abort, amend, graph.
    Sagas {
        #[command(flatten)]
        target: sagas::Target,
        #[command(subcommand)]
        command: sagas::SagasCommand,
    },
    /// Dead letters: list them, or send one back to its topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Applies the Postgres schema migrations (the chart's pre-install and
    /// pre-upgrade Job). Safe to run again and from several places at once.
    Migrate {
        /// The database as its owner role (the migrations create roles,
        /// tables, policies and functions).
        #[arg(long, env = "STATEFABRIC_MIGRATE_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// How long to keep trying while the database cannot be reached
        /// (a Job may start before its database does).
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Tenants: onboard one onto the shared Postgres and Redis.
    Tenants {
        #[command(subcommand)]
        command: tenants::TenantsCommand,
    },
    /// Avro schemas in the Schema Registry.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
}

/// How `fabric` reaches Kafka (SASL/SCRAM when a username is given).
#[derive(Debug, clap::Args)]
struct KafkaArgs {
    #[arg(long, env = "STATEFABRIC_KAFKA_BOOTSTRAP")]
    bootstrap: String,
    #[arg(long, env = "STATEFABRIC_KAFKA_USERNAME", default_value = "")]
    username: String,
    #[arg(
        long,
        env = "STATEFABRIC_KAFKA_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
}

#[cfg(feature = "kafka")]
impl KafkaArgs {
    fn brokers(&self) -> statefabric_kafka::brokers::Brokers {
        statefabric_kafka::brokers::Brokers::new(
            &self.bootstrap,
            statefabric_kafka::brokers::KafkaAuth::scram(&self.username, &self.password),
        )
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists a dead-letter topic: position, why, and the original message.
    List {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The dead-letter topic (dlq.<consumed topic>).
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Sends one dead letter back to the topic it came from.
    Replay {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: i32,
        #[arg(long)]
        offset: i64,
    },
}

#[cfg(not(feature = "kafka"))]
async fn dlq(_command: DlqCommand) -> ExitCode {
    eprintln!("fabric dlq: this fabric was built without Kafka (build it with --features kafka)");
    ExitCode::FAILURE
}

#[cfg(feature = "kafka")]
async fn dlq(command: DlqCommand) -> ExitCode {
    use statefabric_kafka::dead_letter;
    let timeout = Duration::from_secs(10);
    match command {
        DlqCommand::List {
            kafka,
            topic,
            limit,
        } => {
            let listed = tokio::task::spawn_blocking(move || {
                dead_letter::list(&kafka.brokers(), &topic, limit, timeout)
            })
            .await;
            match listed {
                Ok(Ok(letters)) => {
                    for l in letters {
                        let why = |k: &str| l.why.get(k).cloned().unwrap_or_default();
                        println!(
                            "{}/{}\tfrom {}/{}/{}\tattempts {}\tgroup {}\terror: {}\tvalue: {}",
                            l.partition,
                            l.offset,
                            why("topic"),
                            why("partition"),
                            why("offset"),
                            why("attempts"),
                            why("group"),
                            why("error"),
                            String::from_utf8_lossy(l.payload.as_deref().unwrap_or_default())
                        );
                    }
                    ExitCode::SUCCESS
                }
                Ok(Err(err)) => {
                    eprintln!("fabric dlq list: {err}");
                    ExitCode::FAILURE
                }
                Err(err) => {
                    eprintln!("fabric dlq list: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        DlqCommand::Replay {
            kafka,
            topic,
            partition,
            offset,
        } => {
            match dead_letter::replay(&kafka.brokers(), &topic, partition, offset, timeout).await {
                Ok(origin) => {
                    println!("replayed {topic}/{partition}/{offset} to {origin}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("fabric dlq replay: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Registers every message schema (safe to run again), each subject set
    /// to BACKWARD compatibility; prints subject and id. Fails, naming the
    /// subject, if a schema is incompatible with what is registered.
    Register {
        /// The registry's Confluent-compatible API root.
        #[arg(long, env = "STATEFABRIC_SCHEMA_REGISTRY_URL")]
        registry: String,
    },
}

async fn migrate(database_url: &str, wait: Duration) -> ExitCode {
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(250);
    loop {
        // sqlx keeps trying to connect for its own 30 s; the wait given is
        // the bound that counts.
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(result) =
            tokio::time::timeout(remaining, statefabric_db::pg::migrate(database_url)).await
        else {
            eprintln!(
                "fabric migrate: the database could not be reached and migrated within {}s",
                wait.as_secs()
            );
            return ExitCode::FAILURE;
        };
        match result {
            Ok(()) => {
                let last = statefabric_db::pg::MIGRATOR
                    .iter()
                    .map(|m| m.version)
                    .max()
                    .unwrap_or_default();
                println!("fabric migrate: the schema is at migration {last}");
                return ExitCode::SUCCESS;
            }
            // Not reached yet (the migrations themselves did not run).
            Err(err)
                if !matches!(err, sqlx::Error::Migrate(_))
                    && tokio::time::Instant::now() + backoff < deadline =>
            {
                eprintln!(
                    "fabric migrate: the database cannot be reached yet ({err}); trying again"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                eprintln!("fabric migrate: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
}

async fn register_schemas(registry: &str) -> ExitCode {
    let client = statefabric_schema::RegistryClient::new(registry, Duration::from_secs(10));
    match statefabric_schema::catalog::register_all(&client).await {
        Ok(ids) => {
            for (subject, id) in ids {
                println!("{subject}\t{id}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("fabric schemas register: {err}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dlq { command } => dlq(command).await,
        Command::Schemas {
            command: SchemasCommand::Register { registry },
        } => register_schemas(&registry).await,
        Command::Sagas { target, command } => sagas::run(target, command).await,
        Command::Migrate { database_url, wait } => migrate(&database_url, wait).await,
        Command::Tenants { command } => tenants::run(command).await,
        Command::Dev { config, demo } => {
            // Same defaults and ports as production, so an agent runs
            // unchanged against either.
            statefabric_runtime::main(
                "fabric-dev",
                dev::DevConfig::defaults(),
                config.config.as_deref(),
                move |ctx| dev::serve(ctx, demo),
            )
            .await
        }
    }
}
