//! RFC 8785 (JCS) is done by `serde_json_canonicalizer`; this is what JCS leaves to the
//! writer: numbers must be I-JSON (IEEE 754 doubles), so integers beyond 2^53 would come
//! out rounded. RFC 8785 §3.2.2.3 says to carry such numbers as strings, which keeps
//! every digit (kernel keys and 64-bit counters reach them).
use serde_json::Value;

/// The largest integer a double holds exactly.
const SAFE: u64 = (1 << 53) - 1;

/// Replaces integers a double cannot hold exactly by their decimal strings.
pub fn to_ijson(value: &mut Value) {
    match value {
        Value::Number(n) => {
            let unsafe_int = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u > SAFE,
                (None, Some(i)) => i.unsigned_abs() > SAFE,
                _ => false,
            };
            if unsafe_int {
                *value = Value::String(n.to_string());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(to_ijson),
        Value::Object(map) => map.values_mut().for_each(to_ijson),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn big_integers_become_strings_and_small_ones_stay_numbers() {
        let mut v = json!({"a": [18446744073709551615u64, 9007199254740991u64, -9007199254740993i64], "b": 1.5});
        to_ijson(&mut v);
        assert_eq!(v, json!({"a": ["18446744073709551615", 9007199254740991u64, "-9007199254740993"], "b": 1.5}));
    }

    #[test]
    fn the_rfc_8785_number_examples() {
        // RFC 8785 Appendix B, a few of its rows.
        for (bits, want) in [
            (0x0000_0000_0000_0000u64, "0"),
            (0x8000_0000_0000_0000, "0"),
            (0x0000_0000_0000_0001, "5e-324"),
            (0x7fef_ffff_ffff_ffff, "1.7976931348623157e+308"),
            (0x4340_0000_0000_0000, "9007199254740992"),
            (0x4430_0000_0000_0000, "295147905179352830000"),
            (0x44b5_2d02_c7e1_4af6, "1e+23"),
            (0x3eb0_c6f7_a0b5_ed8d, "0.000001"),
            (0x3eb0_c6f7_a0b5_ed8c, "9.999999999999997e-7"),
        ] {
            let text = serde_json_canonicalizer::to_string(&f64::from_bits(bits)).unwrap();
            assert_eq!(text, want, "{bits:#x}");
        }
    }

    #[test]
    fn keys_sort_by_utf16_code_units_and_strings_escape_as_the_rfc_says() {
        // RFC 8785 §3.2.3: "\u{20ac}" (U+20AC) sorts before "\u{1f600}" (a surrogate pair, 0xD83D...).
        let v = json!({"\u{1f600}": 1, "\u{20ac}": 2, "\n": 3, "a": "\u{1}\u{7f}\"/"});
        let text = serde_json_canonicalizer::to_string(&v).unwrap();
        assert_eq!(text, "{\"\\n\":3,\"a\":\"\\u0001\u{7f}\\\"/\",\"\u{20ac}\":2,\"\u{1f600}\":1}");
    }
}
