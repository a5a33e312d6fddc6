//! The imapgate command line: `run`, `check`, `dissect`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "imapgate",
    version,
    about = "A transparent IMAP proxy with Lua policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Once listening, write the bound addresses here as JSON (for port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the configured policies over a recorded C:/S: transcript and print what they did.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// Pretend the client connected over TLS.
        #[arg(long)]
        tls: bool,
        /// The listener name the policies see.
        #[arg(long, default_value = "replay")]
        listener: String,
        /// The client address the policies see.
        #[arg(long, default_value = "127.0.0.1:1")]
        peer: String,
        transcript: PathBuf,
    },
    /// Print one JSON object per IMAP message of a raw byte stream (one direction).
    Dissect {
        #[arg(long, value_enum, default_value = "client")]
        direction: DirectionArg,
        /// The capture to read; standard input when absent.
        file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DirectionArg {
    Client,
    Server,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, ready_file } => run(&config, ready_file.as_deref()),
        Command::Check { config } => check(&config),
        Command::Dissect { direction, file } => dissect(direction, file),
        Command::Replay {
            config,
            tls,
            listener,
            peer,
            transcript,
        } => replay(&config, &transcript, tls, listener, peer),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imapgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = imapgate::config::Config::load(path)?;
    imapgate::server::tls_setup(&config)?;
    if let Some(admin) = &config.admin {
        imapgate::admin::load_token(admin)?;
    }
    let names = imapgate::policy::check(&config)?;
    if let Some(state) = &config.state {
        // A config mistake fails the check; a server that does not answer (yet) is only a
        // warning: imapgate starts without it and connects when it comes.
        match imapgate::state::probe(state) {
            Ok(()) => println!("[state]: Redis at {} answers", state.redis.redacted()),
            Err(e @ imapgate::state::StateError::Config(_)) => return Err(e.into()),
            Err(e) => eprintln!(
                "warning: [state]: Redis at {} does not answer: {e}",
                state.redis.redacted()
            ),
        }
    }
    println!(
        "{}: ok ({} policies: {})",
        path.display(),
        names.len(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn run(path: &std::path::Path, ready_file: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let config = imapgate::config::Config::load(path)?;
    imapgate::server::run(config, path.to_path_buf(), ready_file)?;
    Ok(ExitCode::SUCCESS)
}

fn replay(
    config: &std::path::Path,
    transcript: &std::path::Path,
    tls: bool,
    listener: String,
    peer: String,
) -> anyhow::Result<ExitCode> {
    let config = imapgate::config::Config::load(config)?;
    let text = std::fs::read_to_string(transcript)?;
    let opts = imapgate::replay::ReplayOptions {
        tls,
        listener,
        peer,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    imapgate::replay::replay(&config, &text, &opts, &mut out)?;
    Ok(ExitCode::SUCCESS)
}

fn dissect(direction: DirectionArg, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use std::io::Read;
    let direction = match direction {
        DirectionArg::Client => imapgate::imap::framing::Direction::Client,
        DirectionArg::Server => imapgate::imap::framing::Direction::Server,
    };
    let mut input = Vec::new();
    match file {
        Some(path) => input = std::fs::read(path)?,
        None => {
            std::io::stdin().read_to_end(&mut input)?;
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match imapgate::dissect::dissect(direction, &input, &mut out) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(imapgate::dissect::DissectError::Frame(e)) => {
            use std::io::Write;
            out.flush()?;
            eprintln!(
                "imapgate dissect: framing error at byte offset {}: {}",
                e.offset, e.kind
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}
