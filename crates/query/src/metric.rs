//! Distance metrics and their SIMD kernels (simsimd picks AVX2, AVX-512 or NEON at run time).

use simsimd::SpatialSimilarity;

/// How near two vectors are. The value reported is Milvus's: the squared Euclidean distance
/// for [`Metric::L2`] (smaller is nearer), the inner product for [`Metric::Ip`] and the cosine
/// similarity for [`Metric::Cosine`] (larger is nearer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    L2,
    Ip,
    Cosine,
}

impl Metric {
    /// The metric named `l2`, `ip` or `cosine` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "l2" => Some(Self::L2),
            "ip" => Some(Self::Ip),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::L2 => "l2",
            Self::Ip => "ip",
            Self::Cosine => "cosine",
        }
    }

    /// The reported value for `a` and `b` (equal lengths).
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        let d = match self {
            Self::L2 => <f32 as SpatialSimilarity>::l2sq(a, b),
            Self::Ip => <f32 as SpatialSimilarity>::dot(a, b),
            Self::Cosine => <f32 as SpatialSimilarity>::cos(a, b).map(|d| 1.0 - d),
        };
        d.unwrap_or(f64::NAN) as f32
    }

    /// Whether smaller values are nearer.
    pub fn ascending(self) -> bool {
        self == Self::L2
    }

    /// A key that sorts nearest first; NaN (a zero vector under cosine) sorts last.
    pub fn key(self, distance: f32) -> f32 {
        let k = if self.ascending() {
            distance
        } else {
            -distance
        };
        if k.is_nan() { f32::INFINITY } else { k }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: Metric, a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        match m {
            Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
            Metric::Ip => dot,
            Metric::Cosine => {
                let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
                dot / (na * nb)
            }
        }
    }

    #[test]
    fn kernels_agree_with_the_definitions() {
        let a: Vec<f32> = (0..131).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..131).map(|i| ((i * 5) % 11) as f32 * 0.5).collect();
        for m in [Metric::L2, Metric::Ip, Metric::Cosine] {
            let (got, want) = (m.distance(&a, &b), naive(m, &a, &b));
            assert!(
                (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                "{m:?}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn keys_sort_nearest_first() {
        assert!(Metric::L2.key(1.0) < Metric::L2.key(2.0));
        assert!(Metric::Ip.key(2.0) < Metric::Ip.key(1.0));
        assert!(Metric::Cosine.key(0.9) < Metric::Cosine.key(f32::NAN));
    }
}
