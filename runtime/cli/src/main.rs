//! `acorn-rt`: Acorn's command line for devices (no converter inside). See the crate docs.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "acorn-rt",
    version,
    about = "Acorn on the device: run, inspect, bench and generate with .acorn models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: acorn_cli::Command,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match acorn_cli::dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
