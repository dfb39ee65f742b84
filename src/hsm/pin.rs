//! Reading the HSM user PIN from a file or a systemd credential.
