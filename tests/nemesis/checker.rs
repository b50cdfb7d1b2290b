//! The checker: the node's contract (docs/API.md; "an answer tells the
//! truth") over a recorded history.
//!
//! A model per (partition, key): the writes that may have set it (acked,
//! unknown outcome, refused), and the installs that replaced the whole
//! partition. A read may observe a write that
//! - could have taken effect: acknowledged, or of unknown outcome (a 500
//!   `write_outcome_unknown`, or no answer), invoked before the read ended;
//!   never one answered 503 or 4xx, never an install that answered an error;
//! - and is not known to be overwritten: no write that certainly took
//!   effect (acknowledged, or observed by a read) began after it ended and
//!   took effect before the read began.
//!
//! A write of unknown outcome that a read observed certainly took effect
//! from then on (the model collapses). Lists and exported images are reads
//! of every key. On top: reads at quiescent points before and after a
//! restart must agree (an unknown outcome is stable once settled); the
//! partitions' states only take legal transitions; faults stay where the
//! nemesis put them.
//!
//! In cluster mode (`Rules::cluster`) the same model holds for replicated
//! partitions reached through any node: 503 `no_leader` is one more
//! refusal, and a redirect the client could not follow to an answer is an
//! unknown outcome (for a write) or a failed read.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::history::{Event, History, Kind, Observed};

const REFUSALS: [&str; 4] = ["partition_read_only", "partition_faulted", "partition_unavailable", "shutting_down"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Acked,
    Unknown,
    Refused,
    FailedInstall,
}

#[derive(Debug, Clone)]
struct Producer {
    /// The value it leaves: a write id, or absent.
    x: Option<u64>,
    invoke: u64,
    complete: u64,
    status: Status,
    event: u64,
    /// Certainly in effect from this time on.
    effective: Option<u64>,
}

impl Producer {
    /// What event `e` leaves for one key: `x`, with `status`; in effect
    /// from its completion if it was acknowledged.
    fn of(e: &Event, x: Option<u64>, status: Status) -> Producer {
        let effective = (status == Status::Acked).then_some(e.complete);
        Producer { x, invoke: e.invoke, complete: e.complete, status, event: e.id, effective }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Is(Option<u64>),
    /// Some value (a list shows the key).
    AnyValue,
}

#[derive(Debug, Clone)]
struct Observation {
    want: Want,
    invoke: u64,
    complete: u64,
    event: u64,
}

/// What the checker needs to know about the run.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub partitions: Vec<u64>,
    pub keys: Vec<String>,
    /// A power cut of the only disk may lose a partition's fault record
    /// (docs/FAULTS.md, "Stickiness when the disk itself died").
    pub faults_may_be_lost_on_power_cut: bool,
    /// Replicated partitions of a cluster, reached through any node with
    /// redirects followed: 503 `no_leader` is a refusal too (nothing
    /// written), and a 307 `not_leader` is never a final answer.
    pub cluster: bool,
}

/// Refusals of cluster mode on top of [`REFUSALS`].
const CLUSTER_REFUSALS: [&str; 1] = ["no_leader"];

/// How a put or delete answered, per the API's contract; `Err` for an
/// answer the contract does not allow.
fn write_status(event: &Event, cluster: bool) -> Result<Status, String> {
    match (event.status, event.code.as_str()) {
        (201 | 204, _) => Ok(Status::Acked),
        (503, code) if REFUSALS.contains(&code) => Ok(Status::Refused),
        (503, code) if cluster && CLUSTER_REFUSALS.contains(&code) => Ok(Status::Refused),
        (400 | 413, _) => Ok(Status::Refused),
        (500, "write_outcome_unknown") => Ok(Status::Unknown),
        // No answer: unknown, even "connection refused": the client retries
        // an idempotent request on a fresh connection when a pooled one
        // breaks, so the first attempt may have reached the node.
        (0, _) => Ok(Status::Unknown),
        (status, code) => Err(format!("a write answered {status} {code}, which the contract does not allow")),
    }
}

pub struct Checker<'a> {
    events: &'a [Event],
    by_id: HashMap<u64, usize>,
    rules: Rules,
}

impl<'a> Checker<'a> {
    pub fn new(events: &'a [Event], rules: Rules) -> Checker<'a> {
        let by_id = events.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
        Checker { events, by_id, rules }
    }

    fn event(&self, id: u64) -> &Event {
        &self.events[self.by_id[&id]]
    }

    /// Every violation, each with the history excerpt that shows it.
    pub fn check(&self, history: &History) -> Vec<String> {
        let mut violations: Vec<String> = history.violations.lock().unwrap().clone();
        let images = history.images.lock().unwrap();
        let image_of = |index: usize| images.get(index).map(|(_, contents, _)| contents.clone());

        let mut producers: BTreeMap<(u64, String), Vec<Producer>> = BTreeMap::new();
        let mut observations: BTreeMap<(u64, String), Vec<Observation>> = BTreeMap::new();
        let mut puts: HashMap<u64, (u64, String, Status, u64)> = HashMap::new();
        for &p in &self.rules.partitions {
            for key in &self.rules.keys {
                let initial =
                    Producer { x: None, invoke: 0, complete: 0, status: Status::Acked, event: 0, effective: Some(0) };
                producers.insert((p, key.clone()), vec![initial]);
                observations.insert((p, key.clone()), Vec::new());
            }
        }
        let pool: BTreeSet<&String> = self.rules.keys.iter().collect();
        for e in self.events {
            let slot = e.key.clone().map(|k| (e.partition, k));
            let observe = |observations: &mut BTreeMap<(u64, String), Vec<Observation>>, key: &String, want: Want| {
                if let Some(list) = observations.get_mut(&(e.partition, key.clone())) {
                    list.push(Observation { want, invoke: e.invoke, complete: e.complete, event: e.id });
                }
            };
            match &e.kind {
                Kind::Put { write, .. } | Kind::Delete { write } => {
                    let key = slot.clone().unwrap();
                    if matches!(e.kind, Kind::Delete { .. }) && e.status == 404 && e.code == "blob_not_found" {
                        observe(&mut observations, &key.1, Want::Is(None));
                        continue;
                    }
                    let status = match write_status(e, self.rules.cluster) {
                        Ok(status) => status,
                        Err(why) => {
                            violations.push(format!("{why}: {e}"));
                            Status::Unknown
                        }
                    };
                    let x = if matches!(e.kind, Kind::Put { .. }) { Some(*write) } else { None };
                    if let Some(x) = x {
                        puts.insert(x, (e.partition, key.1.clone(), status, e.id));
                    }
                    if let Some(list) = producers.get_mut(&key) {
                        list.push(Producer::of(e, x, status));
                    }
                }
                Kind::Install { image } => {
                    let status = match e.status {
                        200 => Status::Acked,
                        0 => Status::Unknown,
                        _ => Status::FailedInstall,
                    };
                    let Some(contents) = image_of(*image) else { continue };
                    for key in &self.rules.keys {
                        let x = contents.get(key).copied();
                        if let Some(list) = producers.get_mut(&(e.partition, key.clone())) {
                            list.push(Producer::of(e, x, status));
                        }
                    }
                }
                Kind::Get if e.status == 200 || e.status == 404 => {
                    let key = slot.clone().unwrap();
                    match &e.observed {
                        Observed::Value(w) => observe(&mut observations, &key.1, Want::Is(Some(*w))),
                        Observed::Absent => observe(&mut observations, &key.1, Want::Is(None)),
                        Observed::Garbage(why) => violations.push(format!(
                            "a GET returned bytes that were never written for that key ({why}): {e}\n{}",
                            self.excerpt(e.partition, &key.1, e.complete)
                        )),
                        _ => {}
                    }
                }
                Kind::List if e.status == 200 => {
                    if let Observed::Keys(keys) = &e.observed {
                        let listed: BTreeSet<&String> = keys.iter().collect();
                        for key in listed.difference(&pool) {
                            violations.push(format!("a list returned key {key:?}, never written: {e}"));
                        }
                        for key in &self.rules.keys {
                            let want = if listed.contains(key) { Want::AnyValue } else { Want::Is(None) };
                            observe(&mut observations, key, want);
                        }
                    }
                }
                Kind::Export { .. } if e.status == 200 => {
                    if let Observed::Image(contents) = &e.observed {
                        for key in contents.keys().filter(|k| !pool.contains(k)) {
                            violations.push(format!("an exported image holds key {key:?}, never written: {e}"));
                        }
                        for key in &self.rules.keys {
                            observe(&mut observations, key, Want::Is(contents.get(key).copied()));
                        }
                    }
                }
                _ => {}
            }
        }

        for (slot, list) in producers.iter_mut() {
            // Collapse: an unknown-outcome write that was observed took effect.
            for obs in &observations[slot] {
                let Want::Is(Some(w)) = obs.want else { continue };
                let mut matching = list.iter_mut().filter(|p| p.x == Some(w));
                if let (Some(only), None) = (matching.next(), matching.next())
                    && only.status == Status::Unknown
                {
                    only.effective = Some(only.effective.map_or(obs.complete, |t| t.min(obs.complete)));
                }
            }
        }

        let mut timed: Vec<(u64, String)> = Vec::new();
        for (slot, list) in &producers {
            // Prefix maxima of `invoke` over producers ordered by `effective`.
            let mut certain: Vec<(u64, u64)> = list.iter().filter_map(|p| p.effective.map(|t| (t, p.invoke))).collect();
            certain.sort_unstable();
            let mut prefix_max = Vec::with_capacity(certain.len());
            let mut max = 0;
            for &(_, invoke) in &certain {
                max = max.max(invoke);
                prefix_max.push(max);
            }
            // Latest start of a write that certainly took effect before `t`.
            let latest_before = |t: u64| -> Option<u64> {
                let n = certain.partition_point(|&(eff, _)| eff < t);
                (n > 0).then(|| prefix_max[n - 1])
            };
            let mut first: Option<(u64, String)> = None;
            let mut more = 0;
            for obs in &observations[slot] {
                let bar = latest_before(obs.invoke);
                let legal = |p: &Producer| {
                    let fits = match obs.want {
                        Want::Is(x) => p.x == x,
                        Want::AnyValue => p.x.is_some(),
                    };
                    fits && matches!(p.status, Status::Acked | Status::Unknown)
                        && p.invoke < obs.complete
                        && bar.is_none_or(|bar| bar <= p.complete)
                };
                if list.iter().any(legal) {
                    continue;
                }
                match &first {
                    None => first = Some((obs.complete, self.explain(slot, list, obs, &puts, bar))),
                    Some(_) => more += 1,
                }
            }
            if let Some((at, mut text)) = first {
                if more > 0 {
                    text.push_str(&format!(
                        "  ({more} later reads of this key are wrong too; only the first is shown)\n"
                    ));
                }
                timed.push((at, text));
            }
        }
        // Earliest first: later violations are often consequences.
        timed.sort_by_key(|(at, _)| *at);
        violations.extend(timed.into_iter().map(|(_, text)| text));

        violations.extend(self.stability(history));
        violations.extend(self.states(history));
        violations
    }

    fn explain(
        &self,
        (p, key): &(u64, String),
        list: &[Producer],
        obs: &Observation,
        puts: &HashMap<u64, (u64, String, Status, u64)>,
        bar: Option<u64>,
    ) -> String {
        let excerpt = self.excerpt(*p, key, obs.complete);
        let superseder = || {
            list.iter()
                .filter(|f| f.effective.is_some_and(|t| t < obs.invoke) && Some(f.invoke) == bar)
                .map(|f| self.describe(f.event))
                .next()
                .unwrap_or_default()
        };
        // Writes answered 503 that would explain the observation.
        let refused = |fits: &dyn Fn(&Producer) -> bool| {
            let mut candidates: Vec<&Producer> = list
                .iter()
                .filter(|q| {
                    matches!(q.status, Status::Refused | Status::FailedInstall) && fits(q) && q.invoke < obs.complete
                })
                .collect();
            // Failed installs first, then the latest refused writes.
            candidates.reverse();
            candidates.sort_by_key(|q| q.status != Status::FailedInstall);
            let shown: Vec<String> =
                candidates.iter().take(3).map(|q| format!("\n    {}", self.describe(q.event))).collect();
            if shown.is_empty() {
                String::new()
            } else {
                format!(
                    "\n  only writes answered as not attempted (503), or installs that answered an error, would explain it, e.g.:{}",
                    shown.concat()
                )
            }
        };
        let why = match &obs.want {
            Want::Is(Some(w)) => {
                let mine: Vec<&Producer> = list.iter().filter(|q| q.x == Some(*w)).collect();
                if let Some(refused) = mine.iter().find(|q| q.status == Status::Refused) {
                    format!(
                        "it observed a write that was answered as not attempted (absent-by-503 broken): {}",
                        self.describe(refused.event)
                    )
                } else if let Some(install) = mine.iter().find(|q| q.status == Status::FailedInstall) {
                    format!(
                        "it observed the contents of an install that answered an error (an error must leave no change): {}",
                        self.describe(install.event)
                    )
                } else if mine.is_empty() {
                    match puts.get(w) {
                        Some((p2, k2, _, event)) => format!(
                            "w{w} was written to p{p2} {k2}, never to this key, and no install carried it: {}",
                            self.describe(*event)
                        ),
                        None => format!("w{w} was never written"),
                    }
                } else if mine.iter().all(|q| q.invoke >= obs.complete) {
                    "it observed a write that began only after the read ended".to_string()
                } else {
                    format!(
                        "stale read: w{w} was overwritten by a write that took effect before the read began: {}",
                        superseder()
                    )
                }
            }
            Want::Is(None) => format!(
                "the key reads absent, but a write that took effect before the read began left a value: {}{}",
                superseder(),
                refused(&|q: &Producer| q.x.is_none())
            ),
            Want::AnyValue => format!(
                "the key is listed, but no write that could be in effect left a value (last certain: {}){}",
                superseder(),
                refused(&|q: &Producer| q.x.is_some())
            ),
        };
        format!("p{p} {key}: {}\n  {why}\n{excerpt}", self.event(obs.event))
    }

    fn describe(&self, event: u64) -> String {
        if event == 0 { "the initial (empty) state".to_string() } else { self.event(event).to_string() }
    }

    /// The events on one key (and the partition's installs, recovers and
    /// the nemesis' actions) up to `until`, the last 40.
    pub fn excerpt(&self, p: u64, key: &str, until: u64) -> String {
        let mut lines: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| e.invoke <= until)
            .filter(|e| {
                let noise = matches!(e.kind, Kind::Get | Kind::List | Kind::Export { .. }) && e.status >= 500;
                (e.partition == p && (e.key.as_deref() == Some(key) || e.key.is_none()) && !noise)
                    || matches!(e.kind, Kind::Nemesis(_))
            })
            .collect();
        lines.sort_by_key(|e| e.invoke);
        let skip = lines.len().saturating_sub(40);
        let mut out = String::from("  history excerpt:\n");
        for e in &lines[skip..] {
            out.push_str(&format!("    {e}\n"));
        }
        out
    }

    /// Reads at a quiescent point before a restart and after it agree.
    fn stability(&self, history: &History) -> Vec<String> {
        let injections = history.injections.lock().unwrap();
        type Pair<'e> = (Option<&'e Event>, Option<&'e Event>);
        let mut rounds: BTreeMap<(u64, u64, String), Pair> = BTreeMap::new();
        for e in self.events {
            let (Some((round, after)), Some(key)) = (e.settle, &e.key) else { continue };
            if !matches!(e.observed, Observed::Value(_) | Observed::Absent) {
                continue;
            }
            let entry = rounds.entry((round, e.partition, key.clone())).or_default();
            if after { entry.1 = Some(e) } else { entry.0 = Some(e) }
        }
        let mut out = Vec::new();
        for ((round, p, key), pair) in rounds {
            let (Some(before), Some(after)) = pair else { continue };
            if before.observed != after.observed {
                let unknown = self.events.iter().any(|e| {
                    e.partition == p
                        && e.key.as_deref() == Some(key.as_str())
                        && matches!(e.kind, Kind::Put { .. } | Kind::Delete { .. })
                        && write_status(e, self.rules.cluster).is_ok_and(|s| s == Status::Unknown)
                });
                let damaged = injections
                    .iter()
                    .any(|i| i.partitions.contains(&p) && i.at >= before.complete && i.at <= after.invoke);
                let hint = if damaged {
                    " (the partition was damaged at rest during this restart: lost or broken metadata must fault it, not change what it serves)"
                } else if unknown {
                    " (the key has writes answered write_outcome_unknown: their outcome is not stable)"
                } else {
                    ""
                };
                out.push(format!(
                    "p{p} {key}: what the node serves changed across the restart of settle round {round}{hint}\n  before: {before}\n  after:  {after}\n{}",
                    self.excerpt(p, &key, after.complete)
                ));
            }
        }
        out
    }

    /// Legal state transitions, and faults only where the nemesis put them.
    fn states(&self, history: &History) -> Vec<String> {
        let samples = history.samples.lock().unwrap();
        let injections = history.injections.lock().unwrap();
        let restarts = history.restarts.lock().unwrap();
        let mut out = Vec::new();
        for &p in &self.rules.partitions {
            let mut last: Option<(u64, String, Vec<String>)> = None;
            let mut reported = BTreeSet::new();
            for sample in samples.iter() {
                let Some((state, reasons)) = sample.states.get(&p) else { continue };
                if state == "loading" {
                    continue;
                }
                if state == "faulted" {
                    let cause = reasons.first().cloned().unwrap_or_default();
                    let injected = injections
                        .iter()
                        .any(|i| i.at <= sample.at && (i.partitions.is_empty() || i.partitions.contains(&p)));
                    if cause == "writer_died" {
                        if reported.insert(cause.clone()) {
                            out.push(format!(
                            "p{p} went faulted(writer_died) at {:.3}s: no injected fault kills a partition's writer\n{}",
                            sample.at as f64 / 1e6,
                            self.partition_excerpt(p, sample.at)
                        ));
                        }
                    } else if !injected && reported.insert(format!("uninjected {cause}")) {
                        out.push(format!(
                            "p{p} went faulted({cause}) at {:.3}s, but no fault was injected on it (a fault stays in the partition it hit)\n{}",
                            sample.at as f64 / 1e6,
                            self.partition_excerpt(p, sample.at)
                        ));
                    }
                }
                if let Some((at, was, why)) = &last
                    && was == "faulted"
                    && state != "faulted"
                {
                    let repaired = self.events.iter().any(|e| {
                        e.partition == p
                            && matches!(e.kind, Kind::Recover | Kind::Install { .. })
                            && e.invoke < sample.at
                            && e.complete > *at
                    });
                    let power_cut = self.rules.faults_may_be_lost_on_power_cut
                        && restarts.iter().any(|(t, _, kind)| kind == "power cut" && t > at && *t < sample.at);
                    if !repaired && !power_cut {
                        let failed = self
                            .events
                            .iter()
                            .rev()
                            .find(|e| {
                                e.partition == p
                                    && matches!(e.kind, Kind::Recover | Kind::Install { .. })
                                    && e.invoke < sample.at
                                    && e.status != 200
                            })
                            .map(|e| format!("; the last recover or install before it answered an error (an error must leave no change): {e}"))
                            .unwrap_or_default();
                        out.push(format!(
                            "p{p} left faulted({}) for {state} between {:.3}s and {:.3}s without a recover or an install that succeeded{failed}\n{}",
                            why.join(","),
                            *at as f64 / 1e6,
                            sample.at as f64 / 1e6,
                            self.partition_excerpt(p, sample.at)
                        ));
                    }
                }
                last = Some((sample.at, state.clone(), reasons.clone()));
            }
        }
        out
    }

    fn partition_excerpt(&self, p: u64, until: u64) -> String {
        let mut lines: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| e.invoke <= until && e.invoke + 5_000_000 >= until)
            .filter(|e| {
                matches!(e.kind, Kind::Nemesis(_))
                    || (e.partition == p
                        && !matches!(e.kind, Kind::Get | Kind::List)
                        && !matches!(e.status, 201 | 204 | 404 | 503))
            })
            .collect();
        lines.sort_by_key(|e| e.invoke);
        let skip = lines.len().saturating_sub(40);
        let mut out = String::from(
            "  history excerpt (nemesis actions, and this partition's admin calls and writes answered 500 or not at all, last 5 s):\n",
        );
        for e in &lines[skip..] {
            out.push_str(&format!("    {e}\n"));
        }
        out
    }
}
