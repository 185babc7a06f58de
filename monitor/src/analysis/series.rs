//! A bounded time series of (t, value) samples over a sliding horizon.
use std::collections::VecDeque;

use super::trend;

#[derive(Clone, Debug, Default)]
pub struct Series {
    points: VecDeque<(f64, f64)>,
}

/// Hard cap on points kept, whatever the horizon and tick rate: memory stays bounded.
const MAX_POINTS: usize = 4096;

impl Series {
    pub fn push(&mut self, t: f64, v: f64, horizon: f64) {
        if !v.is_finite() {
            return;
        }
        self.points.push_back((t, v));
        while self.points.front().is_some_and(|(t0, _)| t - t0 > horizon)
            || self.points.len() > MAX_POINTS
        {
            self.points.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.points.clear();
    }

    pub fn last(&self) -> Option<f64> {
        self.points.back().map(|p| p.1)
    }

    /// The last value, if it was taken within `max_age` of `now`.
    pub fn last_fresh(&self, now: f64, max_age: f64) -> Option<f64> {
        self.points
            .back()
            .filter(|(t, _)| now - t <= max_age)
            .map(|p| p.1)
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Points with t >= since.
    pub fn since(&self, since: f64) -> Vec<(f64, f64)> {
        self.points
            .iter()
            .filter(|(t, _)| *t >= since)
            .copied()
            .collect()
    }

    /// How far back the series reaches from `now`.
    pub fn span(&self, now: f64) -> f64 {
        self.points.front().map(|(t0, _)| now - t0).unwrap_or(0.0)
    }

    pub fn slope_since(&self, since: f64) -> Option<f64> {
        trend::theil_sen(&self.since(since))
    }

    /// Median of the values in [from, to].
    pub fn median_between(&self, from: f64, to: f64) -> Option<f64> {
        let mut v: Vec<f64> = self
            .points
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|p| p.1)
            .collect();
        trend::median(&mut v)
    }

    /// The value in force at `at`: the last point taken at or before it (points are in time order).
    pub fn value_at(&self, at: f64) -> Option<f64> {
        let i = self.points.partition_point(|(t, _)| *t <= at);
        i.checked_sub(1).map(|i| self.points[i].1)
    }

    /// The lowest value in [from, to].
    pub fn min_between(&self, from: f64, to: f64) -> Option<f64> {
        self.points
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|p| p.1)
            .reduce(f64::min)
    }

    pub fn min_since(&self, since: f64) -> Option<f64> {
        self.points
            .iter()
            .filter(|(t, _)| *t >= since)
            .map(|p| p.1)
            .reduce(f64::min)
    }

    pub fn max_since(&self, since: f64) -> Option<f64> {
        self.points
            .iter()
            .filter(|(t, _)| *t >= since)
            .map(|p| p.1)
            .reduce(f64::max)
    }
}

/// A step function of time kept over a horizon: a point only where the value changes, and the point in
/// force at the horizon's edge. What [`Series::value_at`] reads of a counter that mostly stands still,
/// for a fraction of the memory (one per ledger row, thousands of rows).
#[derive(Clone, Debug, Default)]
pub struct Steps {
    points: VecDeque<(f64, f64)>,
}

impl Steps {
    pub fn push(&mut self, t: f64, v: f64, horizon: f64) {
        if !v.is_finite() || self.points.back().is_some_and(|(_, last)| *last == v) {
            return;
        }
        self.points.push_back((t, v));
        // The oldest point stays while the next one is still inside the horizon: it is the value in
        // force at the edge.
        while self.points.get(1).is_some_and(|(t1, _)| t - t1 > horizon)
            || self.points.len() > MAX_POINTS
        {
            self.points.pop_front();
        }
    }

    /// The value in force at `at`: the last change at or before it.
    pub fn value_at(&self, at: f64) -> Option<f64> {
        let i = self.points.partition_point(|(t, _)| *t <= at);
        i.checked_sub(1).map(|i| self.points[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_read_as_the_series_of_every_tick_would() {
        let (mut every, mut steps) = (Series::default(), Steps::default());
        let value = |t: u32| f64::from(t / 7 + t / 30);
        for t in 0..400u32 {
            let (t, v) = (f64::from(t), value(t));
            every.push(t, v, 165.0);
            steps.push(t, v, 165.0);
            for back in [0.0, 1.0, 50.0, 105.0, 164.0] {
                assert_eq!(
                    steps.value_at(t - back),
                    every.value_at(t - back),
                    "t={t} back={back}"
                );
            }
        }
        assert!(steps.points.len() < 40, "{} points", steps.points.len());
    }
}
