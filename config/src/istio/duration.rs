//! Protobuf-JSON durations as Istio writes them: `"1s"`, `"0.5s"`, `"100ms"`,
//! `"2m"`, `"1h"`.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration field of an Istio resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IstioDuration(pub Duration);

impl IstioDuration {
    /// Parses `"1.5s"`, `"100ms"`, `"2m"`, `"1h"`, `"250us"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} has no unit (use s, ms, m or h)"))?;
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("duration {text:?} does not start with a number"))?;
        let seconds = match unit {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1e3,
            "us" | "µs" => value / 1e6,
            "ns" => value / 1e9,
            _ => return Err(format!("duration {text:?} has unknown unit {unit:?}")),
        };
        if !seconds.is_finite() || seconds > 315_576_000_000.0 {
            return Err(format!("duration {text:?} is out of range"));
        }
        Ok(Self(Duration::from_secs_f64(seconds)))
    }
}

impl fmt::Display for IstioDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        IstioDuration::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for IstioDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_durations() {
        for (text, ms) in [
            ("1s", 1000),
            ("0.5s", 500),
            ("100ms", 100),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("7s", 7000),
        ] {
            assert_eq!(
                IstioDuration::parse(text).unwrap().0.as_millis(),
                ms,
                "{text}"
            );
        }
        assert!(IstioDuration::parse("5").unwrap_err().contains("no unit"));
        assert!(IstioDuration::parse("xs").is_err());
        assert!(IstioDuration::parse("3 days").is_err());
    }
}
