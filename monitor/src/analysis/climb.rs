//! Tells a bounded set of old connections from a leak, one row at a time.
//!
//! A count of connections older than the idle horizon (one ledger row's, or the sockets one target holds
//! idle past it) moves in one of two shapes:
//! - a **bounded set** steps up once, when what was opened together ages past the horizon (a pool filled
//!   by a burst, watches opened at once, one idle connection per addr), and then stays, or drains when an
//!   idle timeout closes it;
//! - a **leak** keeps climbing: every request leaves one more connection behind (Rancher v2.10.3's
//!   per-request transport), so the count goes on rising long after any fill.
//!
//! So the climb that counts is the rise *after* the fill: an episode begins with the first rise, the
//! count reached within `fill_s` of it is what a bounded set would have filled to, and only what the row
//! adds beyond that is evidence. A drain below the fill (minus the slack a busy row's own closes make)
//! ends the episode: the set was closing, not leaking.

/// One episode of rising: when it began and the count its fill reached.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Episode {
    began: f64,
    fill: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Climb {
    /// The count at the last observation; `None` before the first.
    last: Option<f64>,
    episode: Option<Episode>,
}

impl Climb {
    /// Takes the count at `t`. `fill_s` is how long after its first rise a set may still be filling;
    /// `drain_slack` how far under the fill the count may dip (other connections of the row closing)
    /// before the episode counts as drained.
    pub fn observe(&mut self, t: f64, level: f64, fill_s: f64, drain_slack: f64) {
        let Some(last) = self.last else {
            // What was already there when it could first be seen is no episode of this watch.
            self.last = Some(level);
            return;
        };
        match &mut self.episode {
            None if level > last => {
                self.episode = Some(Episode {
                    began: t,
                    fill: level,
                })
            }
            None => {}
            Some(e) if level < e.fill - drain_slack => self.episode = None,
            Some(e) if t - e.began <= fill_s => e.fill = e.fill.max(level),
            Some(_) => {}
        }
        self.last = Some(level);
    }

    /// Old connections beyond the fill of the current episode: what a bounded set would not have added.
    pub fn beyond_fill(&self) -> f64 {
        match (self.episode, self.last) {
            (Some(e), Some(level)) => (level - e.fill).max(0.0),
            _ => 0.0,
        }
    }

    /// The count at the last observation.
    pub fn level(&self) -> Option<f64> {
        self.last
    }

    /// When the current episode's first rise came.
    pub fn since(&self) -> Option<f64> {
        self.episode.map(|e| e.began)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILL_S: f64 = 10.0;
    const SLACK: f64 = 5.0;

    fn run(levels: impl IntoIterator<Item = (f64, f64)>) -> Climb {
        let mut c = Climb::default();
        for (t, l) in levels {
            c.observe(t, l, FILL_S, SLACK);
        }
        c
    }

    #[test]
    fn a_pool_that_fills_in_a_burst_and_stays_never_climbs() {
        // 50 connections opened within 3 s age past the horizon together, then the pool holds them.
        let c = run((0..600).map(|t| (t as f64, (t as f64 * 17.0).min(50.0))));
        assert_eq!(c.beyond_fill(), 0.0);
        assert_eq!(c.level(), Some(50.0));
    }

    #[test]
    fn a_leak_at_half_a_request_a_second_climbs_past_its_fill() {
        let c = run((0..60).map(|t| (t as f64, (t as f64 * 0.5).floor())));
        // The first 10 s after the first rise (at 2 s) are the fill, to 6 connections; the rest is the leak.
        assert_eq!(c.beyond_fill(), 29.0 - 6.0);
        assert_eq!(c.since(), Some(2.0));
    }

    #[test]
    fn a_leak_in_bursts_climbs_with_every_burst_after_the_first() {
        // 20 leaked connections per burst, a burst a minute.
        let c = run((0..200).map(|t| (t as f64, 20.0 * (t / 60) as f64)));
        assert_eq!(c.beyond_fill(), 40.0);
    }

    #[test]
    fn what_was_there_when_first_seen_is_not_a_climb() {
        let c = run((0..100).map(|t| (t as f64, 300.0)));
        assert_eq!(c.beyond_fill(), 0.0);
        assert_eq!(c.since(), None);
    }

    #[test]
    fn a_pool_drained_by_its_idle_timeout_starts_afresh() {
        // The v2.10.5 pool: 30 old connections, closed by the 90 s timeout, then 30 again, twice.
        let shape = |t: u32| match t % 200 {
            0..=99 => 30.0,
            _ => 0.0,
        };
        let c = run((1..=650).map(|t| (t as f64, shape(t))));
        assert_eq!(c.beyond_fill(), 0.0);
        // Drained at 500 and risen again at 600 is a new episode, not a climb over the old fill.
        assert_eq!(c.since(), Some(600.0));
    }

    #[test]
    fn a_small_dip_from_the_rows_other_closes_keeps_the_episode() {
        let mut levels: Vec<(f64, f64)> = (0..40).map(|t| (t as f64, t as f64)).collect();
        levels.push((40.0, 37.0));
        levels.extend((41..60).map(|t| (t as f64, t as f64 - 3.0)));
        let c = run(levels);
        assert_eq!(c.since(), Some(1.0));
        assert_eq!(c.beyond_fill(), 56.0 - 11.0);
    }
}
