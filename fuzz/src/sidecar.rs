//! One real `statefabric-sidecar` per fuzzing process, on SQLite in a
//! private directory, for the `state_api` target: requests go over gRPC as
//! an agent's would, so validation and conversion are exercised exactly as
//! deployed. The binary is `$STATEFABRIC_FUZZ_SIDECAR` (`fuzz/run.sh` sets
//! it to the workspace's debug build). A static is never dropped: the
//! sidecar outlives the fuzzer, and `fuzz/run.sh` stops it with the
//! target's session.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use statefabric_proto::state::v1 as pb;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

/// The running sidecar and a channel to it.
pub struct Sidecar {
    child: Mutex<Child>,
    pub runtime: Runtime,
    pub channel: Channel,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Sidecar {
    /// The process's sidecar, started on first use.
    pub fn get() -> &'static Sidecar {
        static SIDECAR: OnceLock<Sidecar> = OnceLock::new();
        SIDECAR.get_or_init(Self::start)
    }

    fn start() -> Self {
        let binary = std::env::var_os("STATEFABRIC_FUZZ_SIDECAR").expect(
            "set STATEFABRIC_FUZZ_SIDECAR to a statefabric-sidecar binary (fuzz/run.sh does)",
        );
        let data = std::env::temp_dir().join(format!("statefabric-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&data).expect("a data directory");
        let (grpc, admin) = (free_port(), free_port());
        let child = Command::new(binary)
            .env("STATEFABRIC_SIDECAR__TENANT", "fuzz-tenant")
            .env("STATEFABRIC_SIDECAR__IDENTITY", "fuzzer")
            .env("STATEFABRIC_SIDECAR__LISTEN", format!("127.0.0.1:{grpc}"))
            .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("STATEFABRIC_STORAGE__SQLITE__PATH", data.join("state.db"))
            .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the sidecar");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let url = format!("http://127.0.0.1:{grpc}");
        let channel = runtime.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(channel) = Channel::from_shared(url.clone())
                    .expect("a URL")
                    .connect()
                    .await
                {
                    let mut client =
                        pb::shared_context_client::SharedContextClient::new(channel.clone());
                    let probe = pb::GetContextRequest {
                        document_id: "probe".to_owned(),
                        ..Default::default()
                    };
                    if client
                        .get_context(probe)
                        .await
                        .is_err_and(|s| s.code() == tonic::Code::NotFound)
                    {
                        break channel;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the sidecar did not answer within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            child: Mutex::new(child),
            runtime,
            channel,
        }
    }

    /// Whether the sidecar process still runs.
    pub fn alive(&self) -> bool {
        self.child
            .lock()
            .map(|mut c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }
}
