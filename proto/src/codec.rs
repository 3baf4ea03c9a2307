//! The codec of the `statefabric.control.v1` services: prost encoding, as
//! everywhere, with 1 KiB buffers instead of tonic's 8 KiB. tonic allocates
//! an encode and a decode buffer per RPC up front; a configuration stream
//! lives as long as its sidecar, so a control plane serving a thousand
//! sidecars would hold 16 MiB of mostly empty buffers. Buffers still grow
//! (in 1 KiB steps) for a larger message. The State API keeps the default:
//! its calls are short and their messages often larger.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Buffer size per RPC and direction.
const BUFFER: usize = 1024;
/// tonic's default: how much a stream batches before a send.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `ProstCodec` with small buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
