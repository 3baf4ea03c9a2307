#![no_main]
//! Every State API request, as a real sidecar (SQLite) receives it over
//! gRPC: the first byte picks the RPC, the rest is its request message. A
//! message that decodes as that request is sent; whatever it holds, the
//! answer is a result or a status naming what is wrong — never INTERNAL,
//! UNKNOWN, DATA_LOSS or UNIMPLEMENTED (which would be a bug of ours or a
//! panic in a handler) — and the sidecar keeps running.
//!
//! Calls that may wait (long polls, lock waits, streams) are given a second;
//! one still waiting then is fine.

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use statefabric_fuzz::sidecar::Sidecar;
use statefabric_proto::state::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;

use pb::events_client::EventsClient;
use pb::locks_client::LocksClient;
use pb::sessions_client::SessionsClient;
use pb::shared_context_client::SharedContextClient;
use pb::tasks_client::TasksClient;

/// Sends `bytes` as the request of RPC `which`; `None` when they do not
/// decode as that request. Returns the RPC's name and its outcome.
async fn call(
    which: u8,
    bytes: &[u8],
    ch: Channel,
) -> Option<(&'static str, String, Result<(), tonic::Status>)> {
    macro_rules! rpcs {
        ($($n:literal => $client:ident . $method:ident ( $req:ty )),* $(,)?) => {
            match which % 27 {
                $($n => {
                    let request = <$req>::decode(bytes).ok()?;
                    let shown = format!("{request:?}");
                    let outcome = $client::new(ch).$method(request).await.map(|_| ());
                    Some((stringify!($method), shown, outcome))
                })*
                _ => None,
            }
        };
    }
    rpcs! {
        0 => EventsClient.append_events(pb::AppendEventsRequest),
        1 => EventsClient.read_stream(pb::ReadStreamRequest),
        2 => EventsClient.read_all(pb::ReadAllRequest),
        3 => EventsClient.subscribe_all(pb::SubscribeAllRequest),
        4 => EventsClient.subscribe_stream(pb::SubscribeStreamRequest),
        5 => SharedContextClient.get_context(pb::GetContextRequest),
        6 => SharedContextClient.get_contexts(pb::GetContextsRequest),
        7 => SharedContextClient.put_context(pb::PutContextRequest),
        8 => SharedContextClient.patch_context(pb::PatchContextRequest),
        9 => SharedContextClient.merge_context(pb::MergeContextRequest),
        10 => SharedContextClient.delete_context(pb::DeleteContextRequest),
        11 => SharedContextClient.watch_context(pb::WatchContextRequest),
        12 => LocksClient.acquire(pb::AcquireRequest),
        13 => LocksClient.renew(pb::RenewRequest),
        14 => LocksClient.release(pb::ReleaseRequest),
        15 => LocksClient.inspect(pb::InspectRequest),
        16 => SessionsClient.put_session(pb::PutSessionRequest),
        17 => SessionsClient.get_session(pb::GetSessionRequest),
        18 => SessionsClient.delete_session(pb::DeleteSessionRequest),
        19 => TasksClient.start_saga(pb::StartSagaRequest),
        20 => TasksClient.poll_tasks(pb::PollTasksRequest),
        21 => TasksClient.stream_tasks(pb::StreamTasksRequest),
        22 => TasksClient.heartbeat(pb::HeartbeatRequest),
        23 => TasksClient.complete_task(pb::CompleteTaskRequest),
        24 => TasksClient.fail_task(pb::FailTaskRequest),
        // Writes again: most of the surface that can go wrong is there.
        25 => SharedContextClient.merge_context(pb::MergeContextRequest),
        26 => SharedContextClient.patch_context(pb::PatchContextRequest),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&which, bytes)) = input.split_first() else {
        return;
    };
    let sidecar = Sidecar::get();
    let channel = sidecar.channel.clone();
    let answered = sidecar.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), call(which, bytes, channel)).await
    });
    if let Ok(Some((rpc, request, Err(status)))) = answered {
        assert!(
            !matches!(
                status.code(),
                Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented
            ),
            "{rpc}({request}) answered {status:?}"
        );
    }
    assert!(sidecar.alive(), "the sidecar exited");
});
