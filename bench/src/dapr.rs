//! Dapr as a same-machine peer for the State API benchmark: a daprd process
//! started standalone (no app, no control plane, every address on loopback)
//! with one state store component, and a client for its state calls.
//!
//! The client is written here rather than generated: Dapr's runtime proto
//! imports most of Dapr's API (actors, workflows, AI…), while the benchmark
//! needs five messages of `dapr.proto.runtime.v1`. The messages below carry
//! Dapr's own package, field numbers and types (from `state.proto` and
//! `common.proto` of Dapr 1.18.2), so on the wire they are Dapr's messages.

use std::path::Path;
use std::time::Duration;

use statefabric_tests as env;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The state store daprd serves, named `bench` in its resources.
#[derive(Debug, Clone)]
pub enum Component {
    /// `state.sqlite` on a file, WAL (Dapr's default) with the given
    /// `synchronous` pragma.
    Sqlite { file: std::path::PathBuf },
    /// `state.postgresql` v2 with its tables prefixed.
    Postgres { url: String, table_prefix: String },
    /// `state.redis` on one standalone Redis.
    Redis { host: String },
}

impl Component {
    fn yaml(&self) -> String {
        let (kind, version, metadata) = match self {
            // Dapr's SQLite default is synchronous FULL; ours runs WAL with
            // NORMAL, so the peer does too (durable across process crashes,
            // as ours).
            Self::Sqlite { file } => (
                "state.sqlite",
                "v1",
                vec![(
                    "connectionString",
                    format!("file:{}?_pragma=synchronous(NORMAL)", file.display()),
                )],
            ),
            Self::Postgres { url, table_prefix } => (
                "state.postgresql",
                "v2",
                vec![
                    ("connectionString", url.clone()),
                    ("tablePrefix", table_prefix.clone()),
                ],
            ),
            Self::Redis { host } => ("state.redis", "v1", vec![("redisHost", host.clone())]),
        };
        let mut yaml = format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: bench\nspec:\n  type: {kind}\n  version: {version}\n  metadata:\n"
        );
        for (name, value) in metadata {
            yaml.push_str(&format!("    - name: {name}\n      value: {value:?}\n"));
        }
        yaml
    }
}

/// A daprd process for one run.
#[derive(Debug)]
pub struct Daprd {
    pub child: Child,
    pub channel: Channel,
    _dir: tempfile::TempDir,
}

impl Daprd {
    /// Starts `binary` serving `component` and waits until its gRPC API
    /// answers.
    pub async fn start(binary: &Path, component: &Component) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let resources = dir.path().join("resources");
        std::fs::create_dir_all(&resources)?;
        std::fs::write(resources.join("bench.yaml"), component.yaml())?;
        // mDNS (the default name resolution) multicasts onto the network;
        // nameformat resolves nothing and sends nothing.
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: bench\nspec:\n  nameResolution:\n    component: nameformat\n    configuration:\n      format: \"{appid}.invalid\"\n",
        )?;
        let grpc = env::free_port();
        let ports = [
            ("--dapr-grpc-port", grpc),
            ("--dapr-http-port", env::free_port()),
            ("--dapr-internal-grpc-port", env::free_port()),
            ("--metrics-port", env::free_port()),
            ("--dapr-public-port", env::free_port()),
        ];
        let mut command = Command::new(binary);
        command
            .args(["--app-id", "bench", "--log-level", "warn"])
            .args(["--dapr-listen-addresses", "127.0.0.1"])
            .args(["--placement-host-address", ""])
            .args(["--scheduler-host-address", ""])
            .arg("--resources-path")
            .arg(&resources)
            .arg("--config")
            .arg(&config)
            .kill_on_drop(true);
        for (flag, port) in ports {
            command.arg(flag).arg(port.to_string());
        }
        let child = command.spawn()?;
        let endpoint = format!("http://127.0.0.1:{grpc}");
        let channel = env::eventually("daprd answering", Duration::from_secs(60), || {
            let endpoint = endpoint.clone();
            async move {
                let Ok(channel) = Channel::from_shared(endpoint)?.connect().await else {
                    return Ok(None);
                };
                // Ready once the component is loaded: a read of a missing key
                // answers (empty) instead of "state store not found".
                let mut client = DaprState::new(channel.clone());
                Ok(client.get("ready-probe").await.ok().map(|_| channel))
            }
        })
        .await?;
        Ok(Self {
            child,
            channel,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// `dapr.proto.runtime.v1.Dapr`'s state calls on the `bench` store.
#[derive(Debug, Clone)]
pub struct DaprState {
    grpc: tonic::client::Grpc<Channel>,
}

const STORE: &str = "bench";

impl DaprState {
    pub fn new(channel: Channel) -> Self {
        Self {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn call<Req, Res>(&mut self, method: &'static str, request: Req) -> anyhow::Result<Res>
    where
        Req: prost::Message + Send + Sync + 'static,
        Res: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc.ready().await?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let codec = tonic_prost::ProstCodec::<Req, Res>::default();
        Ok(self
            .grpc
            .unary(tonic::Request::new(request), path, codec)
            .await?
            .into_inner())
    }

    /// The value and its ETag; empty data for a missing key.
    pub async fn get(&mut self, key: &str) -> anyhow::Result<GetStateResponse> {
        self.call(
            "/dapr.proto.runtime.v1.Dapr/GetState",
            GetStateRequest {
                store_name: STORE.into(),
                key: key.into(),
                ..Default::default()
            },
        )
        .await
    }

    /// Saves `value`; with `etag`, only if the stored ETag is still that one.
    pub async fn save(
        &mut self,
        key: &str,
        value: &[u8],
        etag: Option<&str>,
    ) -> anyhow::Result<()> {
        let _: Empty = self
            .call(
                "/dapr.proto.runtime.v1.Dapr/SaveState",
                SaveStateRequest {
                    store_name: STORE.into(),
                    states: vec![StateItem {
                        key: key.into(),
                        value: value.to_vec(),
                        etag: etag.map(|e| Etag { value: e.into() }),
                    }],
                },
            )
            .await?;
        Ok(())
    }

    pub async fn delete(&mut self, key: &str) -> anyhow::Result<()> {
        let _: Empty = self
            .call(
                "/dapr.proto.runtime.v1.Dapr/DeleteState",
                DeleteStateRequest {
                    store_name: STORE.into(),
                    key: key.into(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    pub async fn get_bulk(&mut self, keys: &[String]) -> anyhow::Result<GetBulkStateResponse> {
        self.call(
            "/dapr.proto.runtime.v1.Dapr/GetBulkState",
            GetBulkStateRequest {
                store_name: STORE.into(),
                keys: keys.to_vec(),
                ..Default::default()
            },
        )
        .await
    }
}

// Dapr's messages (dapr/proto/runtime/v1/state.proto, common/v1/common.proto).

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetStateRequest {
    #[prost(string, tag = "1")]
    pub store_name: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(int32, tag = "3")]
    pub consistency: i32,
    #[prost(map = "string, string", tag = "4")]
    pub metadata: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetStateResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    #[prost(string, tag = "2")]
    pub etag: String,
    #[prost(map = "string, string", tag = "3")]
    pub metadata: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetBulkStateRequest {
    #[prost(string, tag = "1")]
    pub store_name: String,
    #[prost(string, repeated, tag = "2")]
    pub keys: Vec<String>,
    #[prost(int32, tag = "3")]
    pub parallelism: i32,
    #[prost(map = "string, string", tag = "4")]
    pub metadata: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetBulkStateResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<BulkStateItem>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BulkStateItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(string, tag = "3")]
    pub etag: String,
    #[prost(string, tag = "4")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SaveStateRequest {
    #[prost(string, tag = "1")]
    pub store_name: String,
    #[prost(message, repeated, tag = "2")]
    pub states: Vec<StateItem>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StateItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub etag: Option<Etag>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Etag {
    #[prost(string, tag = "1")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteStateRequest {
    #[prost(string, tag = "1")]
    pub store_name: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(message, optional, tag = "3")]
    pub etag: Option<Etag>,
}

/// `google.protobuf.Empty`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}
