//! remotedialer's wire format: one websocket *binary* message carries one frame.
//!
//! ```text
//! varint id | varint connID | varint messageType | [varint deadline] | payload
//! ```
//!
//! All three (four) header integers are Go `binary.PutVarint` values, i.e. zig-zag encoded signed
//! LEB128. The legacy deadline field is present only for `Data` and `Connect`; senders put
//! 15000 (ms) there and receivers ignore it. Payloads by type:
//!
//! | type | payload |
//! | --- | --- |
//! | Data (1) | raw bytes |
//! | Connect (2) | `proto/address`, at most 266 bytes |
//! | Error (3) | error text, `EOF` meaning graceful close; receivers read at most 100 bytes |
//! | AddClient (4), RemoveClient (5) | `clientKey/sessionKey`, at most 100 bytes |
//! | Pause (6), Resume (7) | none (trailing bytes ignored, as Go does) |
//! | SyncConnections (8) | little-endian u64 connection ids |
//!
//! Decoding is total: any byte string yields either a frame or a [`FrameError`].

pub use bytes::Bytes;
use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// Largest payload accepted or produced. remotedialer itself has no limit; 1 MiB is far above
/// what any sender writes per frame (Go's io.Copy writes 32 KiB) and bounds memory per message.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Worst-case header: four 10-byte varints.
pub const MAX_HEADER: usize = 40;
/// Websocket message size limit to configure on both ends.
pub const MAX_MESSAGE: usize = MAX_PAYLOAD + MAX_HEADER;
/// Go reads at most this many bytes of a Connect payload.
pub const MAX_CONNECT_PAYLOAD: usize = 266;
/// Go reads at most this many bytes of an AddClient/RemoveClient payload.
pub const MAX_CLIENT_PAYLOAD: usize = 100;
/// Go's receiver keeps at most this many bytes of an Error text.
pub const MAX_ERROR_TEXT: usize = 100;
/// Value remotedialer writes into the unused deadline field.
pub const LEGACY_DEADLINE_MS: i64 = 15_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum MessageType {
    Data = 1,
    Connect = 2,
    Error = 3,
    AddClient = 4,
    RemoveClient = 5,
    Pause = 6,
    Resume = 7,
    SyncConnections = 8,
}

impl MessageType {
    pub fn from_i64(v: i64) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Error,
            4 => Self::AddClient,
            5 => Self::RemoveClient,
            6 => Self::Pause,
            7 => Self::Resume,
            8 => Self::SyncConnections,
            _ => return None,
        })
    }

    fn has_deadline(self) -> bool {
        matches!(self, Self::Data | Self::Connect)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Data(Bytes),
    Connect {
        proto: String,
        address: String,
    },
    /// `"EOF"` is the graceful close; see [`Body::is_eof`].
    Error(String),
    AddClient(String),
    RemoveClient(String),
    Pause,
    Resume,
    SyncConnections(Vec<i64>),
}

impl Body {
    pub fn message_type(&self) -> MessageType {
        match self {
            Body::Data(_) => MessageType::Data,
            Body::Connect { .. } => MessageType::Connect,
            Body::Error(_) => MessageType::Error,
            Body::AddClient(_) => MessageType::AddClient,
            Body::RemoveClient(_) => MessageType::RemoveClient,
            Body::Pause => MessageType::Pause,
            Body::Resume => MessageType::Resume,
            Body::SyncConnections(_) => MessageType::SyncConnections,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message id; informational only (Go logs it).
    pub id: i64,
    pub conn_id: i64,
    pub body: Body,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame truncated while reading {0}")]
    Truncated(&'static str),
    #[error("varint overflows 64 bits while reading {0}")]
    VarintOverflow(&'static str),
    #[error("unknown message type {0}")]
    UnknownType(i64),
    #[error("payload of {len} bytes exceeds the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("connect payload is not proto/address")]
    BadConnect,
    #[error("{0} payload is not UTF-8")]
    NotUtf8(&'static str),
    #[error("sync-connections payload length {0} is not a multiple of 8")]
    BadSyncLength(usize),
}

/// Go's `binary.ReadVarint`: zig-zag over `ReadUvarint`, at most 10 bytes, and the 10th byte
/// may only contribute its lowest bit.
fn read_varint(buf: &mut &[u8], what: &'static str) -> Result<i64, FrameError> {
    let mut x: u64 = 0;
    let mut shift = 0u32;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(FrameError::Truncated(what));
        };
        *buf = rest;
        if b < 0x80 {
            if i == 9 && b > 1 {
                return Err(FrameError::VarintOverflow(what));
            }
            let ux = x | (u64::from(b) << shift);
            let v = (ux >> 1) as i64;
            return Ok(if ux & 1 != 0 { !v } else { v });
        }
        x |= u64::from(b & 0x7f) << shift;
        shift += 7;
    }
    Err(FrameError::VarintOverflow(what))
}

fn put_varint(out: &mut BytesMut, v: i64) {
    let mut ux = ((v as u64) << 1) ^ ((v >> 63) as u64);
    while ux >= 0x80 {
        out.put_u8((ux as u8) | 0x80);
        ux >>= 7;
    }
    out.put_u8(ux as u8);
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, FrameError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| FrameError::NotUtf8(what))
}

fn limited(payload: &[u8], max: usize) -> Result<&[u8], FrameError> {
    if payload.len() > max {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    Ok(payload)
}

impl Frame {
    pub fn new(id: i64, conn_id: i64, body: Body) -> Self {
        Self { id, conn_id, body }
    }

    /// Decodes one websocket message. `Data` payloads share `msg`'s allocation.
    pub fn decode(msg: &Bytes) -> Result<Frame, FrameError> {
        if msg.len() > MAX_MESSAGE {
            return Err(FrameError::TooLarge {
                len: msg.len(),
                max: MAX_MESSAGE,
            });
        }
        let mut cur: &[u8] = msg;
        let id = read_varint(&mut cur, "id")?;
        let conn_id = read_varint(&mut cur, "connID")?;
        let raw_type = read_varint(&mut cur, "messageType")?;
        let mtype = MessageType::from_i64(raw_type).ok_or(FrameError::UnknownType(raw_type))?;
        if mtype.has_deadline() {
            read_varint(&mut cur, "deadline")?;
        }
        let payload = cur;
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let body = match mtype {
            MessageType::Data => Body::Data(msg.slice(msg.len() - payload.len()..)),
            MessageType::Connect => {
                let s = utf8(limited(payload, MAX_CONNECT_PAYLOAD)?, "connect")?;
                let (proto, address) = s.split_once('/').ok_or(FrameError::BadConnect)?;
                Body::Connect {
                    proto: proto.to_owned(),
                    address: address.to_owned(),
                }
            }
            MessageType::Error => {
                // Like Go's receiver: keep the first 100 bytes, never fail on the text itself.
                let t = &payload[..payload.len().min(MAX_ERROR_TEXT)];
                let mut text = String::from_utf8_lossy(t).into_owned();
                // Replacement characters can grow the text; keep it within the limit so that
                // decode(encode(x)) is stable.
                while text.len() > MAX_ERROR_TEXT {
                    text.pop();
                }
                Body::Error(text)
            }
            MessageType::AddClient => {
                Body::AddClient(utf8(limited(payload, MAX_CLIENT_PAYLOAD)?, "addclient")?)
            }
            MessageType::RemoveClient => {
                Body::RemoveClient(utf8(limited(payload, MAX_CLIENT_PAYLOAD)?, "removeclient")?)
            }
            MessageType::Pause => Body::Pause,
            MessageType::Resume => Body::Resume,
            MessageType::SyncConnections => {
                if !payload.len().is_multiple_of(8) {
                    return Err(FrameError::BadSyncLength(payload.len()));
                }
                Body::SyncConnections(
                    payload
                        .chunks_exact(8)
                        .map(|c| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            u64::from_le_bytes(a) as i64
                        })
                        .collect(),
                )
            }
        };
        Ok(Frame { id, conn_id, body })
    }

    /// Encodes exactly as remotedialer's `message.Bytes()`. Errors only if the payload is too big
    /// for a receiver to accept.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let payload_len = match &self.body {
            Body::Data(b) => b.len(),
            Body::Connect { proto, address } => proto.len() + 1 + address.len(),
            Body::Error(s) | Body::AddClient(s) | Body::RemoveClient(s) => s.len(),
            Body::Pause | Body::Resume => 0,
            Body::SyncConnections(ids) => ids.len() * 8,
        };
        let max = match self.body {
            Body::Connect { .. } => MAX_CONNECT_PAYLOAD,
            Body::AddClient(_) | Body::RemoveClient(_) => MAX_CLIENT_PAYLOAD,
            _ => MAX_PAYLOAD,
        };
        if payload_len > max {
            return Err(FrameError::TooLarge {
                len: payload_len,
                max,
            });
        }
        let mtype = self.body.message_type();
        let mut out = BytesMut::with_capacity(MAX_HEADER + payload_len);
        put_varint(&mut out, self.id);
        put_varint(&mut out, self.conn_id);
        put_varint(&mut out, mtype as i64);
        if mtype.has_deadline() {
            put_varint(&mut out, LEGACY_DEADLINE_MS);
        }
        match &self.body {
            Body::Data(b) => out.put_slice(b),
            Body::Connect { proto, address } => {
                out.put_slice(proto.as_bytes());
                out.put_u8(b'/');
                out.put_slice(address.as_bytes());
            }
            Body::Error(s) | Body::AddClient(s) | Body::RemoveClient(s) => {
                out.put_slice(s.as_bytes())
            }
            Body::Pause | Body::Resume => {}
            Body::SyncConnections(ids) => {
                for id in ids {
                    out.put_u64_le(*id as u64);
                }
            }
        }
        Ok(out.freeze())
    }
}

/// Go's `io.EOF.Error()`: the text of a graceful close.
pub const EOF_TEXT: &str = "EOF";

#[cfg(test)]
mod tests {
    use super::*;

    fn all_bodies() -> Vec<Body> {
        vec![
            Body::Data(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")),
            Body::Data(Bytes::new()),
            Body::Data(Bytes::from(vec![7u8; MAX_PAYLOAD])),
            Body::Connect {
                proto: "tcp".into(),
                address: "127.0.0.1:8080".into(),
            },
            Body::Connect {
                proto: "unix".into(),
                address: "/var/run/a/b.sock".into(),
            },
            Body::Error(EOF_TEXT.into()),
            Body::Error("dial tcp: connection refused".into()),
            Body::AddClient("downstream-1/12345".into()),
            Body::RemoveClient("downstream-1/12345".into()),
            Body::Pause,
            Body::Resume,
            Body::SyncConnections(vec![]),
            Body::SyncConnections(vec![1, 2, i64::MAX, -5]),
        ]
    }

    #[test]
    fn round_trip_every_type() {
        for (i, body) in all_bodies().into_iter().enumerate() {
            for (id, conn) in [(0, 0), (1, 2), (i64::MAX, i64::MIN), (-1, 1 << 40)] {
                let f = Frame::new(id.wrapping_add(i as i64 % 3), conn, body.clone());
                let enc = f.encode().expect("encode");
                let dec = Frame::decode(&enc).expect("decode");
                assert_eq!(dec, f);
            }
        }
    }

    #[test]
    fn matches_go_bytes() {
        // Go: newConnect(2, "tcp", "127.0.0.1:80") with id 1 ->
        // PutVarint(1)=02, PutVarint(2)=04, PutVarint(2)=04, PutVarint(15000)=b0 ea 01
        let f = Frame::new(
            1,
            2,
            Body::Connect {
                proto: "tcp".into(),
                address: "127.0.0.1:80".into(),
            },
        );
        let enc = f.encode().expect("encode");
        assert_eq!(&enc[..6], &[0x02, 0x04, 0x04, 0xb0, 0xea, 0x01]);
        assert_eq!(&enc[6..], b"tcp/127.0.0.1:80");
        // Pause carries no deadline field.
        let p = Frame::new(-1, 3, Body::Pause).encode().expect("encode");
        assert_eq!(&p[..], &[0x01, 0x06, 0x0c]);
    }

    #[test]
    fn truncated_frames_are_errors() {
        for body in all_bodies() {
            let enc = Frame::new(300, 70000, body).encode().expect("encode");
            // Every strict prefix that cuts the header must fail; cuts inside the payload either
            // fail or decode to a (shorter) valid frame, but never panic.
            for cut in 0..enc.len().min(64) {
                let _ = Frame::decode(&enc.slice(..cut));
            }
            assert!(matches!(
                Frame::decode(&enc.slice(..1)),
                Err(FrameError::Truncated(_))
            ));
        }
        assert_eq!(
            Frame::decode(&Bytes::new()),
            Err(FrameError::Truncated("id"))
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let unknown = Bytes::from_static(&[0x02, 0x02, 0x12]); // type 9
        assert_eq!(Frame::decode(&unknown), Err(FrameError::UnknownType(9)));
        let zero = Bytes::from_static(&[0x02, 0x02, 0x00]);
        assert_eq!(Frame::decode(&zero), Err(FrameError::UnknownType(0)));
        let overflow = Bytes::from(vec![0xffu8; 11]);
        assert!(matches!(
            Frame::decode(&overflow),
            Err(FrameError::VarintOverflow(_))
        ));
        let mut tenth = vec![0x80u8; 9];
        tenth.push(0x02);
        assert!(matches!(
            Frame::decode(&Bytes::from(tenth)),
            Err(FrameError::VarintOverflow(_))
        ));
        let no_slash = Bytes::from_static(&[0x02, 0x02, 0x04, 0x00, b't', b'c', b'p']);
        assert_eq!(Frame::decode(&no_slash), Err(FrameError::BadConnect));
        let bad_utf8 = Bytes::from_static(&[0x02, 0x02, 0x04, 0x00, 0xff, b'/', b'x']);
        assert_eq!(
            Frame::decode(&bad_utf8),
            Err(FrameError::NotUtf8("connect"))
        );
        let sync = Bytes::from_static(&[0x02, 0x00, 0x10, 1, 2, 3]);
        assert_eq!(Frame::decode(&sync), Err(FrameError::BadSyncLength(3)));
        let mut long_connect = vec![0x02, 0x02, 0x04, 0x00];
        long_connect.extend(std::iter::repeat_n(b'a', MAX_CONNECT_PAYLOAD + 1));
        assert!(matches!(
            Frame::decode(&Bytes::from(long_connect)),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut big = vec![0x02, 0x02, 0x02, 0x00];
        big.extend(std::iter::repeat_n(0u8, MAX_PAYLOAD + 1));
        assert!(matches!(
            Frame::decode(&Bytes::from(big)),
            Err(FrameError::TooLarge { .. })
        ));
        let huge = Frame::new(1, 1, Body::Data(Bytes::from(vec![0u8; MAX_PAYLOAD + 1])));
        assert!(matches!(huge.encode(), Err(FrameError::TooLarge { .. })));
        let long_client = Frame::new(1, 0, Body::AddClient("x".repeat(101)));
        assert!(long_client.encode().is_err());
    }

    #[test]
    fn long_error_text_is_truncated_like_go() {
        let f = Frame::new(1, 5, Body::Error("e".repeat(500)));
        let dec = Frame::decode(&f.encode().expect("encode")).expect("decode");
        assert_eq!(dec.body, Body::Error("e".repeat(MAX_ERROR_TEXT)));
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic, no dev-dependency needed.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let len = (next() % 48) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards valid headers so that payload parsers get exercised too.
            if len >= 3 && next() % 2 == 0 {
                v[0] = 2;
                v[1] = 4;
                v[2] = ((next() % 9) as u8) << 1;
            }
            if let Ok(f) = Frame::decode(&Bytes::from(v)) {
                // Anything we accept we can re-encode and read back identically.
                if let Ok(enc) = f.encode() {
                    assert_eq!(Frame::decode(&enc).expect("re-decode"), f);
                }
            }
        }
    }
}
