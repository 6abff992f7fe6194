//! Civil UTC date and time from Unix seconds, for file names and
//! timestamps (no time-zone database needed).

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Utc {
    /// The time `secs` seconds after 1970-01-01T00:00:00Z (Howard
    /// Hinnant's days-to-civil algorithm).
    pub fn from_unix(secs: u64) -> Utc {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let z = (days as i64) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Utc {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// Seconds since 1970-01-01T00:00:00Z (days-from-civil); `None` for a
    /// field out of range or a time before 1970.
    pub fn to_unix(&self) -> Option<u64> {
        if !(1..=12).contains(&self.month)
            || !(1..=31).contains(&self.day)
            || self.hour > 23
            || self.minute > 59
            || self.second > 60
        {
            return None;
        }
        let y = self.year - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era.checked_mul(146_097)?.checked_add(doe - 719_468)?;
        let secs = days.checked_mul(86_400)?.checked_add(
            i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second),
        )?;
        u64::try_from(secs).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Utc;

    #[test]
    fn to_unix_inverts_from_unix() {
        for secs in [
            0u64,
            59,
            86_399,
            86_400,
            951_782_400,
            1_795_703_193,
            4_102_444_800,
        ] {
            assert_eq!(Utc::from_unix(secs).to_unix(), Some(secs), "{secs}");
        }
        let mut bad = Utc::from_unix(0);
        bad.month = 13;
        assert_eq!(bad.to_unix(), None);
    }

    fn t(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Utc {
        Utc {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
        }
    }

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(Utc::from_unix(0), t(1970, 1, 1, 0, 0, 0));
        assert_eq!(Utc::from_unix(951_782_400), t(2000, 2, 29, 0, 0, 0));
        assert_eq!(Utc::from_unix(951_955_199), t(2000, 3, 1, 23, 59, 59));
        assert_eq!(Utc::from_unix(1_795_703_193), t(2026, 11, 26, 14, 26, 33));
        assert_eq!(Utc::from_unix(4_102_444_800), t(2100, 1, 1, 0, 0, 0));
    }
}
