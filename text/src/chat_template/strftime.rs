//! `strftime_now(format)` for chat templates (Llama 3.2 and others print today's date), with
//! the subset of C `strftime` those templates use. Dates are UTC: a server's notion of "today"
//! should not depend on the host's time zone setting.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A UTC calendar time, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday
    pub weekday: u32,
    /// 1..=366
    pub day_of_year: u32,
}

impl DateTime {
    pub fn now() -> Self {
        let seconds = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => elapsed.as_secs() as i64,
            Err(before) => -(before.duration().as_secs() as i64),
        };
        Self::from_unix(seconds)
    }

    /// Howard Hinnant's `civil_from_days`, proleptic Gregorian.
    pub fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy_march + 2) / 153;
        let day = (doy_march - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const BEFORE_MONTH: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = BEFORE_MONTH[month as usize - 1] + day + u32::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: second_of_day / 3600,
            minute: second_of_day / 60 % 60,
            second: second_of_day % 60,
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year,
        }
    }

    /// Formats like Python's `datetime.strftime` for `%Y %y %m %d %e %j %H %I %M %S %p %b %B
    /// %h %a %A %w %u %F %T %D %%`; any other directive is copied through unchanged, as glibc
    /// does.
    pub fn strftime(&self, format: &str) -> String {
        let mut out = String::with_capacity(format.len() + 16);
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(directive) = chars.next() else {
                out.push('%');
                break;
            };
            let month_name = MONTHS[self.month as usize - 1];
            let weekday_name = WEEKDAYS[self.weekday as usize];
            let hour12 = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            let piece = match directive {
                'Y' => self.year.to_string(),
                'y' => format!("{:02}", self.year.rem_euclid(100)),
                'm' => format!("{:02}", self.month),
                'd' => format!("{:02}", self.day),
                'e' => format!("{:>2}", self.day),
                'j' => format!("{:03}", self.day_of_year),
                'H' => format!("{:02}", self.hour),
                'I' => format!("{hour12:02}"),
                'M' => format!("{:02}", self.minute),
                'S' => format!("{:02}", self.second),
                'p' => (if self.hour < 12 { "AM" } else { "PM" }).to_string(),
                'B' => month_name.to_string(),
                'b' | 'h' => month_name[..3].to_string(),
                'A' => weekday_name.to_string(),
                'a' => weekday_name[..3].to_string(),
                'w' => ((self.weekday + 1) % 7).to_string(),
                'u' => (self.weekday + 1).to_string(),
                'F' => format!("{}-{:02}-{:02}", self.year, self.month, self.day),
                'T' => format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second),
                'D' => format!(
                    "{:02}/{:02}/{:02}",
                    self.month,
                    self.day,
                    self.year.rem_euclid(100)
                ),
                '%' => "%".to_string(),
                other => format!("%{other}"),
            };
            out.push_str(&piece);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        // 2024-07-26 00:00:00 UTC, a Friday (Llama 3.1's default date).
        let t = DateTime::from_unix(1_721_952_000);
        assert_eq!(t.strftime("%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            t.strftime("%A %B %j %F %T %%"),
            "Friday July 208 2024-07-26 00:00:00 %"
        );
        // 2000-02-29 13:05:09 UTC, a Tuesday in a leap year.
        let t = DateTime::from_unix(951_829_509);
        assert_eq!(
            t.strftime("%a %e %m/%d/%y %I:%M:%S %p %j %w %u"),
            "Tue 29 02/29/00 01:05:09 PM 060 2 2"
        );
        // Before the epoch.
        assert_eq!(
            DateTime::from_unix(-86_400).strftime("%F %a"),
            "1969-12-31 Wed"
        );
        assert_eq!(DateTime::from_unix(0).strftime("%Q"), "%Q");
    }
}
