//! The kernel's limits on what execve(2) carries (fs/exec.c): each argument or
//! environment string at most `MAX_ARG_STRLEN` bytes, at most `MAX_ARG_STRINGS` of each,
//! and all strings (with the file name) plus one pointer per string within a quarter of
//! the stack limit (at most three quarters of 8 MiB, at least 32 pages). A command line
//! over them is refused before anything starts, with the limit it broke; everything
//! within them reaches the command whole.
use std::ffi::OsStr;

use crate::sys;

/// Longest argument or environment string, its NUL included (32 pages of 4 KiB).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Most argument (or environment) strings.
pub const MAX_ARG_STRINGS: usize = 0x7FFF_FFFF;
/// The kernel's floor for the strings' total (`ARG_MAX`, 32 pages).
const ARG_MAX_FLOOR: u64 = 32 * 4096;
/// `_STK_LIM` (8 MiB): the total never exceeds three quarters of it.
const STK_LIM: u64 = 8 * 1024 * 1024;

/// Why a command line cannot be exec'd.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecSizeError {
    #[error("{what} {index} is {len} bytes; the kernel takes at most {max} per string (MAX_ARG_STRLEN)", max = MAX_ARG_STRLEN - 1)]
    StringTooLong { what: &'static str, index: usize, len: usize },
    #[error("{count} {what} strings; the kernel takes at most {MAX_ARG_STRINGS}")]
    TooMany { what: &'static str, count: usize },
    #[error("arguments and environment take {total} bytes; the kernel takes at most {limit} here (a quarter of the stack limit, `ulimit -s`)")]
    TooLarge { total: u64, limit: u64 },
}

/// The byte budget of argv+envp for a process whose soft stack limit is `stack`.
pub fn limit_for_stack(stack: u64) -> u64 {
    (STK_LIM / 4 * 3).min(stack / 4).max(ARG_MAX_FLOOR)
}

/// The byte budget of argv+envp for a child of this process.
pub fn host_limit() -> u64 {
    // Without an answer, the floor every kernel grants.
    sys::stack_rlimit().map(limit_for_stack).unwrap_or(ARG_MAX_FLOOR)
}

/// The lengths (without NUL) of the strings in `list`.
pub fn lengths<S: AsRef<OsStr>>(list: &[S]) -> Vec<usize> {
    list.iter().map(|s| s.as_ref().len()).collect()
}

/// Checks that an execve(2) of a file name of `exe` bytes with arguments and environment
/// strings of the given lengths (NULs not counted) is within the kernel's limits when
/// the strings may take `limit` bytes (see [`limit_for_stack`]).
pub fn check(exe: usize, argv: &[usize], envp: &[usize], limit: u64) -> Result<(), ExecSizeError> {
    let mut total = exe as u64 + 1;
    for (what, strings) in [("argument", argv), ("environment entry", envp)] {
        if strings.len() > MAX_ARG_STRINGS {
            return Err(ExecSizeError::TooMany { what, count: strings.len() });
        }
        for (index, &len) in strings.iter().enumerate() {
            if len + 1 > MAX_ARG_STRLEN {
                return Err(ExecSizeError::StringTooLong { what, index, len });
            }
            total += len as u64 + 1;
        }
    }
    let pointers = (argv.len().max(1) + envp.len()) as u64 * std::mem::size_of::<usize>() as u64;
    // The pointers come off the budget first; the kernel also keeps one word back.
    let total = total + pointers + std::mem::size_of::<usize>() as u64;
    if total > limit {
        return Err(ExecSizeError::TooLarge { total, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const EIGHT_MIB: u64 = 8 * 1024 * 1024;

    #[test]
    fn the_budget_follows_the_stack_limit() {
        assert_eq!(limit_for_stack(EIGHT_MIB), 2 * 1024 * 1024);
        assert_eq!(limit_for_stack(u64::MAX), 6 * 1024 * 1024);
        assert_eq!(limit_for_stack(64 * 1024), 128 * 1024);
    }

    #[test]
    fn thousands_of_arguments_fit() {
        let argv: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        let envp: Vec<String> = (0..600).map(|i| format!("K{i}=v")).collect();
        assert_eq!(check(9, &lengths(&argv), &lengths(&envp), limit_for_stack(EIGHT_MIB)), Ok(()));
    }

    #[test]
    fn an_over_long_string_is_refused_with_its_index() {
        let err = check(9, &[4, MAX_ARG_STRLEN], &[], u64::MAX).unwrap_err();
        assert_eq!(err, ExecSizeError::StringTooLong { what: "argument", index: 1, len: MAX_ARG_STRLEN });
        assert_eq!(check(9, &[4, MAX_ARG_STRLEN - 1], &[], u64::MAX), Ok(()));
        let err = check(9, &[4], &[3, MAX_ARG_STRLEN], u64::MAX).unwrap_err();
        assert_eq!(err, ExecSizeError::StringTooLong { what: "environment entry", index: 1, len: MAX_ARG_STRLEN });
    }

    #[test]
    fn the_total_counts_strings_nuls_and_pointers() {
        // "/x\0" + "a\0" + "B=c\0" + 2 pointers + 1 word.
        let total = 3 + 2 + 4 + 16 + 8;
        assert_eq!(check(2, &[1], &[3], total), Ok(()));
        assert_eq!(check(2, &[1], &[3], total - 1), Err(ExecSizeError::TooLarge { total, limit: total - 1 }));
    }
}
