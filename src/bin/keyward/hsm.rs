//! `keyward hsm ...`: the HSM itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;

use crate::Failure;

/// `keyward hsm` subcommands.
#[derive(Subcommand)]
pub(crate) enum HsmCommand {
    /// Development and tests only: serve a software YubiHSM 2 (the yubihsm
    /// crate's MockHsm) over the yubihsm-connector HTTP protocol until
    /// killed. SIGUSR1 takes it down, SIGUSR2 brings it back.
    #[cfg(feature = "yubihsm-mock")]
    #[command(hide = true)]
    MockConnector {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write the bound port into this file.
        #[arg(long)]
        port_file: Option<PathBuf>,
        /// Milliseconds each message takes inside the mock device.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Exit once this directory is removed.
        #[arg(long)]
        exit_when_gone: Option<PathBuf>,
    },
}

/// Runs `keyward hsm ...`.
pub(crate) fn run(command: HsmCommand) -> Result<(), Failure> {
    match command {
        #[cfg(feature = "yubihsm-mock")]
        HsmCommand::MockConnector {
            listen,
            port_file,
            latency_ms,
            exit_when_gone,
        } => {
            keyward::hsm::yubihsm::mock_connector::serve(
                keyward::hsm::yubihsm::mock_connector::MockConnectorOptions {
                    listen,
                    port_file,
                    latency: std::time::Duration::from_millis(latency_ms),
                    exit_when_gone,
                },
            )?;
            Ok(())
        }
    }
}
