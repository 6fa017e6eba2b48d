//! The fixed date `strftime_now` formats (transformers formats the clock; we format a fixed
//! date, so that the same data always gives the same tokens), with the little calendar it needs.

/// The date `strftime_now` formats, fixed for reproducible data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedDate {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Default for FixedDate {
    /// 26 Jul 2024, the date the Llama-3.1 template uses when none is given.
    fn default() -> Self {
        FixedDate {
            year: 2024,
            month: 7,
            day: 26,
            hour: 0,
            minute: 0,
            second: 0,
        }
    }
}

impl FixedDate {
    /// Parses `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().splitn(3, '-');
        let year = it.next()?.parse().ok()?;
        let month = it.next()?.parse().ok()?;
        let day = it.next()?.parse().ok()?;
        let d = FixedDate {
            year,
            month,
            day,
            ..Default::default()
        };
        ((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month)).then_some(d)
    }

    /// Formats the date like Python's `datetime.strftime` (C locale) for the common directives:
    /// `%d %-d %e %m %-m %Y %y %B %b %h %A %a %H %-H %I %M %S %p %j %F %T %%`.
    pub fn strftime(&self, fmt: &str) -> std::result::Result<String, String> {
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
        const DAYS: [&str; 7] = [
            "Sunday",
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
        ];
        let month = MONTHS[(self.month as usize).clamp(1, 12) - 1];
        let weekday = DAYS[weekday(self.year, self.month, self.day)];
        let mut out = String::with_capacity(fmt.len() + 16);
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut d = chars.next().ok_or("format ends with a lone %")?;
            let no_pad = d == '-';
            if no_pad {
                d = chars.next().ok_or("format ends with %-")?;
            }
            let num = |v: u32, w: usize| {
                if no_pad {
                    v.to_string()
                } else {
                    format!("{v:0w$}")
                }
            };
            match d {
                'd' => out.push_str(&num(self.day, 2)),
                'e' => out.push_str(&format!("{:>2}", self.day)),
                'm' => out.push_str(&num(self.month, 2)),
                'Y' => out.push_str(&self.year.to_string()),
                'y' => out.push_str(&num(self.year.rem_euclid(100) as u32, 2)),
                'B' => out.push_str(month),
                'b' | 'h' => out.push_str(&month[..3]),
                'A' => out.push_str(weekday),
                'a' => out.push_str(&weekday[..3]),
                'H' => out.push_str(&num(self.hour, 2)),
                'I' => out.push_str(&num((self.hour + 11) % 12 + 1, 2)),
                'M' => out.push_str(&num(self.minute, 2)),
                'S' => out.push_str(&num(self.second, 2)),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'j' => {
                    let doy = (1..self.month)
                        .map(|m| days_in_month(self.year, m))
                        .sum::<u32>()
                        + self.day;
                    out.push_str(&num(doy, 3));
                }
                'F' => out.push_str(&format!(
                    "{:04}-{:02}-{:02}",
                    self.year, self.month, self.day
                )),
                'T' => out.push_str(&format!(
                    "{:02}:{:02}:{:02}",
                    self.hour, self.minute, self.second
                )),
                '%' => out.push('%'),
                other => return Err(format!("strftime directive %{other} is not supported")),
            }
        }
        Ok(out)
    }
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Day of the week, 0 = Sunday (Sakamoto's method).
fn weekday(y: i32, m: u32, d: u32) -> usize {
    const T: [i32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let y = if m < 3 { y - 1 } else { y };
    let m = (m as usize).clamp(1, 12);
    ((y + y / 4 - y / 100 + y / 400 + T[m - 1] + d as i32).rem_euclid(7)) as usize
}
