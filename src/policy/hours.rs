//! Active hours: the wall-clock windows, in an IANA time zone, during which
//! an agent may sign.
//!
//! A window is `"DAYS HH:MM-HH:MM"`: DAYS is `daily`, one day (`Mon`), a
//! range (`Mon-Fri`, `Fri-Mon`) or a list (`Sat,Sun`); the end is exclusive
//! and may be `24:00`. A window whose end is earlier than its start crosses
//! midnight: `Fri 22:00-02:00` is Friday 22:00 to Saturday 02:00. Times are
//! local wall-clock times, so daylight saving time moves them with the
//! clocks (jiff's time-zone database).

use jiff::Timestamp;
use jiff::tz::TimeZone;

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    /// Days the window starts on, Monday first.
    days: [bool; 7],
    /// Start, minutes after local midnight.
    start: u16,
    /// End (exclusive), minutes after local midnight, up to 1440.
    end: u16,
    /// As written in the policy.
    text: String,
}

/// An agent's active hours.
#[derive(Debug, Clone)]
pub struct ActiveHours {
    tz_name: String,
    tz: TimeZone,
    windows: Vec<Window>,
}

impl PartialEq for ActiveHours {
    fn eq(&self, other: &Self) -> bool {
        self.tz_name == other.tz_name && self.windows == other.windows
    }
}

impl Eq for ActiveHours {}

fn day_index(name: &str) -> Option<usize> {
    DAY_NAMES.iter().position(|d| d.eq_ignore_ascii_case(name))
}

fn parse_days(spec: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if spec.eq_ignore_ascii_case("daily") || spec == "*" {
        return Ok([true; 7]);
    }
    for part in spec.split(',') {
        let unknown = |d: &str| format!("{d:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)");
        match part.split_once('-') {
            Some((a, b)) => {
                let a = day_index(a).ok_or_else(|| unknown(a))?;
                let b = day_index(b).ok_or_else(|| unknown(b))?;
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day_index(part).ok_or_else(|| unknown(part))?] = true,
        }
    }
    Ok(days)
}

fn parse_time(t: &str) -> Result<u16, String> {
    let bad = || format!("{t:?} is not a time HH:MM (00:00 to 24:00)");
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_window(text: &str) -> Result<Window, String> {
    let (days, times) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("{text:?} is not \"DAYS HH:MM-HH:MM\""))?;
    let (start, end) = times
        .trim()
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not \"DAYS HH:MM-HH:MM\""))?;
    let (start, end) = (parse_time(start)?, parse_time(end)?);
    if start == end || start == 24 * 60 {
        return Err(format!("{text:?} is an empty window"));
    }
    Ok(Window {
        days: parse_days(days.trim())?,
        start,
        end,
        text: text.trim().to_owned(),
    })
}

impl ActiveHours {
    /// Parses a time zone name and windows; errors say what is wrong.
    pub fn parse(tz: &str, windows: &[String]) -> Result<ActiveHours, String> {
        let zone = jiff::tz::db()
            .get(tz)
            .map_err(|_| format!("{tz:?} is not an IANA time zone known here"))?;
        if windows.is_empty() {
            return Err("list at least one window, e.g. \"Mon-Fri 08:00-20:00\"".into());
        }
        let windows = windows
            .iter()
            .map(|w| parse_window(w))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActiveHours {
            tz_name: tz.to_owned(),
            tz: zone,
            windows,
        })
    }

    /// Whether the instant `now_ms` (Unix milliseconds) is inside a window.
    pub fn allows(&self, now_ms: i64) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(now_ms) else {
            return false;
        };
        let local = ts.to_zoned(self.tz.clone());
        let day = usize::from(local.weekday().to_monday_zero_offset().unsigned_abs());
        let yesterday = (day + 6) % 7;
        let minute = u16::try_from(local.hour()).unwrap_or(0) * 60
            + u16::try_from(local.minute()).unwrap_or(0);
        self.windows.iter().any(|w| {
            if w.start < w.end {
                w.days[day] && w.start <= minute && minute < w.end
            } else {
                (w.days[day] && minute >= w.start) || (w.days[yesterday] && minute < w.end)
            }
        })
    }

    /// The windows, for messages: `Mon-Fri 08:00-20:00 (Europe/Berlin)`.
    pub fn describe(&self) -> String {
        let windows: Vec<&str> = self.windows.iter().map(|w| w.text.as_str()).collect();
        format!("{} ({})", windows.join(", "), self.tz_name)
    }

    /// The local time at `now_ms`, for messages.
    pub fn local_time(&self, now_ms: i64) -> String {
        Timestamp::from_millisecond(now_ms)
            .map(|ts| {
                let z = ts.to_zoned(self.tz.clone());
                format!(
                    "{} {}",
                    DAY_NAMES[usize::from(z.weekday().to_monday_zero_offset().unsigned_abs())],
                    z.strftime("%H:%M %Z")
                )
            })
            .unwrap_or_else(|_| "an invalid time".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn hours(tz: &str, w: &[&str]) -> ActiveHours {
        ActiveHours::parse(tz, &w.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn weekday_windows_in_a_zone() {
        let h = hours("Europe/Berlin", &["Mon-Fri 08:00-20:00"]);
        // Wed 2026-11-25: CET (UTC+1).
        assert!(!h.allows(ms("2026-11-25T06:59:59Z")), "07:59 local");
        assert!(h.allows(ms("2026-11-25T07:00:00Z")), "08:00 local");
        assert!(h.allows(ms("2026-11-25T18:59:59Z")), "19:59 local");
        assert!(
            !h.allows(ms("2026-11-25T19:00:00Z")),
            "20:00 local: the end is exclusive"
        );
        // Saturday.
        assert!(!h.allows(ms("2026-11-28T12:00:00Z")));
    }

    #[test]
    fn daylight_saving_time_moves_the_window_with_the_clocks() {
        // Berlin switches to CEST (UTC+2) on Sunday 2026-03-29 at 01:00 UTC.
        let h = hours("Europe/Berlin", &["Sun 08:00-20:00"]);
        // One week before: 06:30 UTC is 07:30 CET, outside.
        assert!(!h.allows(ms("2026-03-22T06:30:00Z")));
        assert!(h.allows(ms("2026-03-22T07:30:00Z")));
        // On the day of the change: 06:30 UTC is 08:30 CEST, inside.
        assert!(h.allows(ms("2026-03-29T06:30:00Z")));
        assert!(!h.allows(ms("2026-03-29T05:59:00Z")), "07:59 CEST");
        assert!(!h.allows(ms("2026-03-29T18:00:00Z")), "20:00 CEST");
        // The skipped hour: 02:00-03:00 local does not exist that night.
        let night = hours("Europe/Berlin", &["Sun 02:00-03:00"]);
        assert!(!night.allows(ms("2026-03-29T00:59:00Z")), "01:59 CET");
        assert!(!night.allows(ms("2026-03-29T01:00:00Z")), "03:00 CEST");
        // Autumn: 2026-10-25 01:00 UTC back to CET; 02:30 local happens twice.
        assert!(night.allows(ms("2026-10-25T00:30:00Z")), "02:30 CEST");
        assert!(night.allows(ms("2026-10-25T01:30:00Z")), "02:30 CET");
    }

    #[test]
    fn windows_that_cross_midnight() {
        let h = hours("UTC", &["Fri 22:00-02:00"]);
        // 2026-11-27 is a Friday.
        assert!(!h.allows(ms("2026-11-27T21:59:00Z")));
        assert!(h.allows(ms("2026-11-27T22:00:00Z")));
        assert!(h.allows(ms("2026-11-27T23:59:00Z")));
        assert!(
            h.allows(ms("2026-11-28T00:00:00Z")),
            "Saturday 00:00 belongs to Friday's window"
        );
        assert!(h.allows(ms("2026-11-28T01:59:00Z")));
        assert!(!h.allows(ms("2026-11-28T02:00:00Z")));
        // Thursday night is not Friday's window.
        assert!(!h.allows(ms("2026-11-26T23:00:00Z")));
        assert!(
            !h.allows(ms("2026-11-27T01:00:00Z")),
            "Friday 01:00 would need Thursday's window"
        );
        // Day ranges wrap around the week; 24:00 closes the day.
        let h = hours("UTC", &["Sat-Sun 00:00-24:00", "Mon 09:00-10:00"]);
        assert!(h.allows(ms("2026-11-29T23:59:00Z")), "Sunday");
        assert!(!h.allows(ms("2026-11-30T00:30:00Z")), "Monday 00:30");
        assert!(h.allows(ms("2026-11-30T09:30:00Z")));
    }

    #[test]
    fn bad_zones_and_windows_are_refused_with_what_is_wrong() {
        let parse = |tz: &str, w: &str| ActiveHours::parse(tz, &[w.to_owned()]);
        assert!(
            parse("Mars/Olympus", "daily 08:00-09:00")
                .unwrap_err()
                .contains("time zone")
        );
        assert!(parse("UTC", "Mon 08:00").is_err());
        assert!(
            parse("UTC", "Funday 08:00-09:00")
                .unwrap_err()
                .contains("not a day")
        );
        assert!(
            parse("UTC", "Mon 25:00-26:00")
                .unwrap_err()
                .contains("not a time")
        );
        assert!(parse("UTC", "Mon 8:00-9:00").is_err());
        assert!(
            parse("UTC", "Mon 09:00-09:00")
                .unwrap_err()
                .contains("empty")
        );
        assert!(ActiveHours::parse("UTC", &[]).is_err());
    }
}
