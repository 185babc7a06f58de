//! Robust statistics for short, noisy series: medians and the Theil–Sen slope (median of pairwise
//! slopes), which a single burst or a scrape hiccup cannot drag the way a least-squares fit would.

pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Theil–Sen slope of (t, v) points, in units of v per second. `None` with fewer than 3 points or no
/// spread in time. Quadratic in the number of points, which the callers keep small (one per tick over a
/// window of tens of seconds; longer series are thinned to at most `MAX_POINTS`).
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    const MAX_POINTS: usize = 120;
    if points.len() < 3 {
        return None;
    }
    let step = points.len().div_ceil(MAX_POINTS);
    let pts: Vec<(f64, f64)> = points.iter().step_by(step).copied().collect();
    let mut slopes = Vec::with_capacity(pts.len() * pts.len() / 2);
    for i in 0..pts.len() {
        for j in i + 1..pts.len() {
            let dt = pts[j].0 - pts[i].0;
            if dt > 1e-9 {
                slopes.push((pts[j].1 - pts[i].1) / dt);
            }
        }
    }
    median(&mut slopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn slope_ignores_a_spike() {
        let mut pts: Vec<(f64, f64)> = (0..30)
            .map(|t| (t as f64, 100.0 + 0.5 * t as f64))
            .collect();
        pts[10].1 = 10_000.0;
        pts[11].1 = 9_000.0;
        let s = theil_sen(&pts).unwrap();
        assert!((s - 0.5).abs() < 0.05, "{s}");
    }

    #[test]
    fn flat_noisy_series_has_no_slope() {
        let pts: Vec<(f64, f64)> = (0..60)
            .map(|t| (t as f64, 50.0 + [0.0, 3.0, -2.0, 1.0, -3.0][t % 5]))
            .collect();
        assert!(theil_sen(&pts).unwrap().abs() < 0.05);
    }
}
