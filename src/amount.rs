//! Exact conversion between decimal strings in UI units and integer base units.

/// Why an amount string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not of the form `digits[.digits]`.
    #[error("amount {0:?} is not a plain decimal number (digits with an optional '.')")]
    Syntax(String),
    /// More fractional digits than the asset has decimals.
    #[error("amount {value:?} has more than {decimals} decimal places")]
    TooPrecise {
        /// The amount as given.
        value: String,
        /// The asset's decimals.
        decimals: u8,
    },
    /// Larger than a u64 of base units.
    #[error("amount {0:?} is too large")]
    TooLarge(String),
}

/// Parses a decimal string such as `"1.25"` into base units with `decimals`
/// fractional digits, exactly. No sign, exponent, whitespace or separators.
pub fn parse_units(value: &str, decimals: u8) -> Result<u64, AmountError> {
    let syntax = || AmountError::Syntax(value.chars().take(64).collect());
    let (int_part, frac_part) = match value.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (value, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let frac = match frac_part {
        Some(f) if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) => return Err(syntax()),
        Some(f) => f,
        None => "",
    };
    if frac.len() > usize::from(decimals) {
        return Err(AmountError::TooPrecise {
            value: value.chars().take(64).collect(),
            decimals,
        });
    }
    let too_large = || AmountError::TooLarge(value.chars().take(64).collect());
    let mut units: u64 = 0;
    for b in int_part.bytes() {
        units = units
            .checked_mul(10)
            .and_then(|u| u.checked_add(u64::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    for _ in 0..decimals {
        units = units.checked_mul(10).ok_or_else(too_large)?;
    }
    let mut frac_units: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        let place = u32::from(decimals) - 1 - i as u32;
        let digit = u64::from(b - b'0')
            .checked_mul(10u64.checked_pow(place).ok_or_else(too_large)?)
            .ok_or_else(too_large)?;
        frac_units += digit;
    }
    units.checked_add(frac_units).ok_or_else(too_large)
}

/// Formats base units as a decimal string with trailing zeros removed
/// (`1_250_000_000` with 9 decimals is `"1.25"`).
pub fn format_units(units: u128, decimals: u8) -> String {
    let scale = 10u128.pow(u32::from(decimals));
    let int = units / scale;
    let frac = units % scale;
    if frac == 0 {
        return int.to_string();
    }
    let mut f = format!("{frac:0width$}", width = usize::from(decimals));
    while f.ends_with('0') {
        f.pop();
    }
    format!("{int}.{f}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_units("1.25", 9), Ok(1_250_000_000));
        assert_eq!(parse_units("0.000000001", 9), Ok(1));
        assert_eq!(parse_units("20", 9), Ok(20_000_000_000));
        assert_eq!(parse_units("007.5", 6), Ok(7_500_000));
        assert_eq!(parse_units("18446744073.709551615", 9), Ok(u64::MAX));
    }

    #[test]
    fn refuses_malformed_imprecise_and_overflowing_amounts() {
        for bad in [
            "", ".", "1.", ".5", "-1", "+1", "1e9", "1,5", " 1", "1 ", "0x10", "1.2.3", "١",
        ] {
            assert!(
                matches!(parse_units(bad, 9), Err(AmountError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_units("0.0000000001", 9),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_units("1.5", 0),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_units("18446744073.709551616", 9),
            Err(AmountError::TooLarge(_))
        ));
        assert!(matches!(
            parse_units("99999999999999999999999", 0),
            Err(AmountError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_units(1_250_000_000, 9), "1.25");
        assert_eq!(format_units(0, 9), "0");
        assert_eq!(format_units(1, 9), "0.000000001");
        assert_eq!(format_units(5, 0), "5");
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(units in any::<u64>(), decimals in 0u8..=12) {
            let s = format_units(u128::from(units), decimals);
            prop_assert_eq!(parse_units(&s, decimals), Ok(units));
        }
    }
}
