//! The gRPC codec of Walden's services: prost, encoding each message into room reserved for it.
//!
//! tonic's prost encoder writes a message into a buffer of 8 KiB that grows by doubling, so a
//! consume frame of a few hundred messages was copied about twice (`perf` under `walden bench
//! catchup`: `BytesMut::reserve_inner` → `memmove`, 5–7% of the server's samples). This one
//! reserves the message's encoded length first: one allocation, one copy.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
};
use tonic_prost::ProstDecoder;

/// Prost encoding and decoding of `T` (sent) and `U` (received).
#[derive(Debug, Clone)]
pub struct WaldenCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WaldenCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WaldenCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes with prost into a buffer first grown to the message's length.
#[derive(Debug, Clone)]
pub struct ReservingEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = item.encoded_len();
        buf.reserve(len);
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a {len}-byte message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
