//! The history of a nemesis run: every client operation, nemesis action and
//! state sample, with invocation and completion times; self-describing
//! values; a reader for snapshot images.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A seeded SplitMix64: each client and the nemesis have their own.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Index chosen by weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut roll = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if roll < w {
                return i;
            }
            roll -= w;
        }
        weights.len() - 1
    }
}

/// FNV-1a, 64 bits: the checksum inside every value.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A value that names its write: `nemesis|w<id>|p<partition>|<key>|n<len>|`,
/// filler derived from the id up to `len` bytes, then `|` and the checksum of
/// everything before it in 16 hex digits. A torn, shifted or foreign value
/// fails to decode; a decodable value names exactly one write.
pub fn encode_value(id: u64, partition: u64, key: &str, len: usize) -> Vec<u8> {
    let mut body = format!("nemesis|w{id}|p{partition}|{key}|n{len}|").into_bytes();
    let mut i = 0u64;
    while body.len() + 17 < len {
        body.push(b'a' + ((id.wrapping_mul(31).wrapping_add(i)) % 26) as u8);
        i += 1;
    }
    let sum = fnv64(&body);
    body.extend_from_slice(format!("|{sum:016x}").as_bytes());
    body
}

/// What a value says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueId {
    pub write: u64,
    pub partition: u64,
    pub key: String,
}

/// Decodes and verifies a value; `Err` says why it is not one we wrote.
pub fn decode_value(bytes: &[u8]) -> Result<ValueId, String> {
    let short = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned();
    if bytes.len() < 17 {
        return Err(format!("{} bytes, too short to be a nemesis value: {:?}", bytes.len(), short(bytes)));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 17);
    let sum = std::str::from_utf8(&tail[1..]).ok().and_then(|t| u64::from_str_radix(t, 16).ok());
    if tail[0] != b'|' || sum != Some(fnv64(body)) {
        return Err(format!("checksum mismatch (torn or foreign bytes), {} bytes: {:?}", bytes.len(), short(bytes)));
    }
    let text = String::from_utf8_lossy(body);
    let mut parts = text.splitn(6, '|');
    let (magic, w, p, key, n) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
    let parsed = (|| {
        if magic != Some("nemesis") {
            return None;
        }
        let write = w?.strip_prefix('w')?.parse().ok()?;
        let partition = p?.strip_prefix('p')?.parse().ok()?;
        let len: usize = n?.strip_prefix('n')?.parse().ok()?;
        Some((write, partition, key?.to_string(), len))
    })();
    let Some((write, partition, key, len)) = parsed else {
        return Err(format!("checksum fine but header unreadable: {:?}", short(bytes)));
    };
    let expected = encode_value(write, partition, &key, len);
    if expected != bytes {
        return Err(format!("w{write} decodes but its bytes differ from what was written ({} bytes)", bytes.len()));
    }
    Ok(ValueId { write, partition, key })
}

/// A parsed snapshot image: key -> the write whose value it holds.
pub type ImageContents = BTreeMap<String, u64>;

/// Reads a snapshot image (header, entries, trailer; see the API's
/// snapshot endpoints) into its keys and value identities. `Err` when the
/// image does not parse or an entry's value is not one we wrote.
pub fn parse_image(bytes: &[u8]) -> Result<ImageContents, String> {
    let mut at = 16usize;
    if bytes.len() < 16 || &bytes[..8] != b"DNSNAP\x00\x01" {
        return Err("no snapshot header".into());
    }
    let mut out = ImageContents::new();
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let slice = bytes.get(*at..*at + n).ok_or_else(|| format!("image truncated at byte {at}"))?;
        *at += n;
        Ok(slice)
    };
    loop {
        let tag = take(&mut at, 1)?[0];
        match tag {
            1 => {
                let klen = u16::from_le_bytes(take(&mut at, 2)?.try_into().unwrap()) as usize;
                let vlen = u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap()) as usize;
                let key = String::from_utf8_lossy(take(&mut at, klen)?).into_owned();
                let value = take(&mut at, vlen)?;
                take(&mut at, 4)?;
                let id = decode_value(value).map_err(|e| format!("image entry {key}: {e}"))?;
                if id.key != key {
                    return Err(format!("image entry {key} holds the value of key {} (w{})", id.key, id.write));
                }
                out.insert(key, id.write);
            }
            2 => {
                take(&mut at, 12)?;
                if at != bytes.len() {
                    return Err("bytes after the image trailer".into());
                }
                return Ok(out);
            }
            other => return Err(format!("unknown image tag {other} at byte {}", at - 1)),
        }
    }
}

/// What an operation was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Put {
        write: u64,
        len: usize,
    },
    Delete {
        write: u64,
    },
    Get,
    List,
    Export {
        image: Option<usize>,
    },
    Install {
        image: usize,
    },
    Recover,
    ReadOnly(bool),
    Compact,
    /// A nemesis action or harness event (fault on/off, restart, ...).
    Nemesis(String),
}

/// What a read saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Nothing,
    /// GET 200: the value's identity.
    Value(u64),
    /// GET 200 with bytes that are not a value we wrote.
    Garbage(String),
    /// GET 404.
    Absent,
    /// List 200.
    Keys(Vec<String>),
    /// Export 200, parsed.
    Image(ImageContents),
}

/// The client number of the reads at quiescent points.
pub const SETTLE_CLIENT: usize = usize::MAX - 1;

/// A read at a quiescent point around a restart: (round, after the restart?).
pub type SettleTag = Option<(u64, bool)>;

#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    /// Client number; `usize::MAX` for the nemesis and the harness.
    pub client: usize,
    pub step: u64,
    pub kind: Kind,
    pub partition: u64,
    pub key: Option<String>,
    /// Microseconds since the run started.
    pub invoke: u64,
    pub complete: u64,
    /// HTTP status; 0 when there was no answer.
    pub status: u16,
    /// The JSON error code, or for status 0 the transport error.
    pub code: String,
    pub observed: Observed,
    pub settle: SettleTag,
    /// The nodes a request went through, redirects followed (`dn-1>dn-3`);
    /// empty on a single node.
    pub via: String,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.client {
            usize::MAX => "nemesis".to_string(),
            SETTLE_CLIENT => "settle".to_string(),
            client => format!("c{client}"),
        };
        let what = match &self.kind {
            Kind::Put { write, len } => format!("PUT w{write} ({len} B)"),
            Kind::Delete { write } => format!("DELETE w{write}"),
            Kind::Get => "GET".into(),
            Kind::List => "LIST".into(),
            Kind::Export { image } => format!("EXPORT -> image {image:?}"),
            Kind::Install { image } => format!("INSTALL image {image}"),
            Kind::Recover => "RECOVER".into(),
            Kind::ReadOnly(on) => format!("READ-ONLY {on}"),
            Kind::Compact => "COMPACT".into(),
            Kind::Nemesis(what) => format!("** {what}"),
        };
        let seen = match &self.observed {
            Observed::Nothing => String::new(),
            Observed::Value(w) => format!(" -> w{w}"),
            Observed::Garbage(why) => format!(" -> GARBAGE {why}"),
            Observed::Absent => " -> absent".into(),
            Observed::Keys(keys) => format!(" -> {} keys", keys.len()),
            Observed::Image(image) => format!(" -> image of {} keys", image.len()),
        };
        let settle = match self.settle {
            Some((round, after)) => format!(" [settle round {round} {}]", if after { "after" } else { "before" }),
            None => String::new(),
        };
        let key = self.key.as_deref().map(|k| format!(" {k}")).unwrap_or_default();
        let via = if self.via.is_empty() { String::new() } else { format!(" via {}", self.via) };
        let p = if self.partition == 0 { String::new() } else { format!(" p{}", self.partition) };
        write!(
            f,
            "#{} step {} {who} [{:.3}s..{:.3}s] {what}{p}{key}{via}: {} {}{seen}{settle}",
            self.id,
            self.step,
            self.invoke as f64 / 1e6,
            self.complete as f64 / 1e6,
            self.status,
            self.code
        )
    }
}

/// One sample of `GET /v1/partitions`: partition -> (state, reasons).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: u64,
    pub states: BTreeMap<u64, (String, Vec<String>)>,
}

/// A fault the nemesis injected: when, and which partitions it may fault
/// (empty: every partition, e.g. a power cut).
#[derive(Debug, Clone)]
pub struct Injection {
    pub at: u64,
    pub partitions: Vec<u64>,
}

/// Everything recorded, shared by the clients, the poller and the nemesis.
#[derive(Debug)]
pub struct History {
    started: Instant,
    next_id: AtomicU64,
    next_write: AtomicU64,
    pub events: Mutex<Vec<Event>>,
    pub samples: Mutex<Vec<Sample>>,
    pub injections: Mutex<Vec<Injection>>,
    /// Restarts: (time, incarnation after, kind).
    pub restarts: Mutex<Vec<(u64, u64, String)>>,
    /// Violations the harness saw directly (exits, /healthz).
    pub violations: Mutex<Vec<String>>,
    pub images: Mutex<Vec<(u64, ImageContents, Vec<u8>)>>,
}

impl History {
    pub fn new() -> History {
        History {
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            next_write: AtomicU64::new(1),
            events: Mutex::new(Vec::new()),
            samples: Mutex::new(Vec::new()),
            injections: Mutex::new(Vec::new()),
            restarts: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            images: Mutex::new(Vec::new()),
        }
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    pub fn write_id(&self) -> u64 {
        self.next_write.fetch_add(1, Ordering::Relaxed)
    }

    pub fn push(&self, mut event: Event) -> u64 {
        event.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = event.id;
        self.events.lock().unwrap().push(event);
        id
    }

    /// A nemesis or harness event, instantaneous.
    pub fn note(&self, step: u64, what: String) {
        let now = self.now();
        self.push(Event {
            id: 0,
            client: usize::MAX,
            step,
            kind: Kind::Nemesis(what),
            partition: 0,
            key: None,
            invoke: now,
            complete: now,
            status: 0,
            code: String::new(),
            observed: Observed::Nothing,
            settle: None,
            via: String::new(),
        });
    }

    pub fn inject(&self, step: u64, partitions: Vec<u64>, what: &str) {
        self.injections.lock().unwrap().push(Injection { at: self.now(), partitions: partitions.clone() });
        self.note(step, format!("fault on {partitions:?}: {what}"));
    }

    pub fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }
}
