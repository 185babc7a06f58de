#![no_main]
//! remotedialer frames come straight off an agent's websocket: decoding must be total, and
//! whatever decodes must survive an encode/decode round trip unchanged.
use libfuzzer_sys::fuzz_target;
use reftunnel::frame::Frame;

fuzz_target!(|data: &[u8]| {
    let msg = reftunnel::frame::Bytes::copy_from_slice(data);
    if let Ok(frame) = Frame::decode(&msg) {
        if let Ok(enc) = frame.encode() {
            assert_eq!(Frame::decode(&enc).ok(), Some(frame));
        }
    }
});
