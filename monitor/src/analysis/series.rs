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

    /// The value in force at `at`: the last point taken at or before it.
    pub fn value_at(&self, at: f64) -> Option<f64> {
        self.points
            .iter()
            .take_while(|(t, _)| *t <= at)
            .last()
            .map(|p| p.1)
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
