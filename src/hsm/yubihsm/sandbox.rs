//! What a YubiHSM 2 connection needs from keywardd's own seccomp filter.
//!
//! keywardd's base filter (seccomp/keywardd.json) allows no `ioctl` and
//! only AF_UNIX sockets. A YubiHSM on USB is driven by libusb inside
//! keywardd, and a session is re-opened after the lockdown whenever the
//! device was lost or its session expired, so the USB calls must stay
//! allowed: [`USB_EXTENSION`] (seccomp/backends/yubihsm-usb.json), in the
//! format of an operator's `seccomp.d` extension file, with the USB ioctls
//! restricted to their request numbers, which keywardd merges into its
//! filter for `connector = "usb"` (`BackendProgram::YubiHsmUsb`). It is derived from libusb's source
//! and needs confirming on hardware (seccomp/README.md).
//!
//! ```
//! let ext = keyward::hsm::yubihsm::sandbox::usb_extension()?;
//! assert!(ext.allow.iter().any(|r| r.syscall == "ioctl"));
//! # Ok::<(), keyward::harden::seccomp::SeccompError>(())
//! ```

use std::path::Path;

use crate::harden::seccomp::{BackendProgram, Extension, SeccompError, parse_extension};

/// Where [`USB_EXTENSION`] lives in the sources.
pub const USB_EXTENSION_FILE: &str = "seccomp/backends/yubihsm-usb.json";

/// The extra seccomp rules (and Landlock write path, `/dev/bus/usb`) of
/// `hsm.connector = "usb"`, built into the binary.
pub const USB_EXTENSION: &str = BackendProgram::YubiHsmUsb.json();

/// [`USB_EXTENSION`] parsed and checked like an operator's extension file
/// (every rule compiled by seccompiler, none of the never-allowed calls).
pub fn usb_extension() -> Result<Extension, SeccompError> {
    parse_extension(Path::new(USB_EXTENSION_FILE), USB_EXTENSION)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;

    /// Linux's `_IOC(dir, 'U', nr, size)` (asm-generic/ioctl.h).
    const fn usbdevfs(dir: u32, nr: u32, size: u32) -> u32 {
        (dir << 30) | (size << 16) | ((b'U' as u32) << 8) | nr
    }
    const NONE: u32 = 0;
    const WRITE: u32 = 1;
    const READ: u32 = 2;

    /// The usbfs requests libusb makes for the YubiHSM's life cycle (open,
    /// reset, claim, bulk transfers, cancel, release), with the struct
    /// sizes of x86_64 (linux/usbdevice_fs.h).
    fn expected_ioctls() -> BTreeSet<u64> {
        [
            usbdevfs(READ | WRITE, 0, 24), // CONTROL
            usbdevfs(READ, 10, 56),        // SUBMITURB
            usbdevfs(NONE, 11, 0),         // DISCARDURB
            usbdevfs(WRITE, 13, 8),        // REAPURBNDELAY
            usbdevfs(READ, 15, 4),         // CLAIMINTERFACE
            usbdevfs(READ, 16, 4),         // RELEASEINTERFACE
            usbdevfs(NONE, 20, 0),         // RESET
            usbdevfs(READ, 26, 4),         // GET_CAPABILITIES
        ]
        .into_iter()
        .map(u64::from)
        .collect()
    }

    /// `(index, value)` of each `eq` condition of a rule.
    fn eq_conditions(args: &[serde_json::Value]) -> Vec<(u64, u64)> {
        args.iter()
            .map(|a| {
                assert_eq!(a["op"], "eq", "{a}");
                (a["index"].as_u64().unwrap(), a["val"].as_u64().unwrap())
            })
            .collect()
    }

    #[test]
    fn the_usb_extension_parses_compiles_and_restricts_what_seccomp_can_see() {
        let ext = usb_extension().unwrap();
        assert!(ext.comment.contains("NOT YET TRACED ON HARDWARE"));
        assert_eq!(ext.write_paths, [PathBuf::from("/dev/bus/usb")]);

        let mut ioctls = BTreeSet::new();
        let mut calls = BTreeSet::new();
        for rule in &ext.allow {
            calls.insert(rule.syscall.as_str());
            let conds = rule.args.as_deref().map(eq_conditions);
            match rule.syscall.as_str() {
                // Never unconditional: the request number is the one thing
                // seccomp can check on an ioctl.
                "ioctl" => {
                    let conds = conds.unwrap();
                    assert_eq!(conds.len(), 1, "{}", rule.comment);
                    assert_eq!(conds[0].0, 1, "the request is argument 1");
                    assert!(ioctls.insert(conds[0].1), "listed twice: {}", rule.comment);
                }
                // AF_NETLINK (16), NETLINK_KOBJECT_UEVENT (15) only.
                "socket" => assert_eq!(conds.unwrap(), [(0, 16), (2, 15)]),
                // SOL_SOCKET (1), SO_PASSCRED (16) only.
                "setsockopt" => assert_eq!(conds.unwrap(), [(1, 1), (2, 16)]),
                _ => assert!(conds.is_none(), "{}: {:?}", rule.syscall, rule.args),
            }
        }
        assert_eq!(ioctls, expected_ioctls(), "the usbfs requests");
        let expected: BTreeSet<&str> = [
            "ioctl",
            "socket",
            "bind",
            "setsockopt",
            "recvmsg",
            "eventfd2",
            "timerfd_create",
            "timerfd_settime",
            "uname",
        ]
        .into_iter()
        .collect();
        assert_eq!(calls, expected);
    }

    #[test]
    fn a_broken_usb_extension_would_be_refused() {
        // The parser the test relies on does refuse: the same file with an
        // unconditional execve, or a misspelt call.
        let bad = USB_EXTENSION.replacen("\"uname\"", "\"execve\"", 1);
        assert!(parse_extension(Path::new(USB_EXTENSION_FILE), &bad).is_err());
        let bad = USB_EXTENSION.replacen("\"uname\"", "\"unamee\"", 1);
        assert!(parse_extension(Path::new(USB_EXTENSION_FILE), &bad).is_err());
    }
}
