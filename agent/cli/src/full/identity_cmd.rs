//! `agt-jail identity key|token`: an agent's public key for verifiers (from outside,
//! through its control socket) and a token for the agent (from inside, through its
//! identity socket). See docs/identity.md.
use std::{path::PathBuf, process::ExitCode};

use agt_jail_supervisor::{control, identity_socket};
use clap::{Args, Subcommand};

use crate::{control_cmd::AgentArg, EXIT_INTERNAL};

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Print a running agent's public key as a JWK Set (what a tool server verifies its
    /// tokens with), with its DID.
    Key(AgentArg),
    /// Ask agt-jail for a token (JWT-SVID) naming this agent: run by a process of the
    /// agent; agt-jail answers only processes of the agent's own cgroup.
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Who the token is for (its `aud` claim): the tool server that will verify it.
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,

    /// The identity socket. Default: $AGT_JAIL_IDENTITY_SOCKET, set by agt-jail for the agent.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

pub fn run(cmd: IdentityCommand) -> ExitCode {
    match cmd {
        IdentityCommand::Key(target) => match control::request(&target.runtime_dir, &target.agent, "key") {
            Ok(answer) => {
                let out = serde_json::json!({"did": answer["did"], "jwks": answer["jwks"]});
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_else(|_| out.to_string()));
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("agt-jail: {err}");
                ExitCode::from(if matches!(err, control::ControlError::Refused { .. }) { 1 } else { EXIT_INTERNAL })
            }
        },
        IdentityCommand::Token(args) => {
            let Some(socket) = args.socket.or_else(|| std::env::var_os(identity_socket::SOCKET_ENV).map(PathBuf::from))
            else {
                eprintln!(
                    "agt-jail: no identity socket: {} is not set (not an agent under policy); use --socket",
                    identity_socket::SOCKET_ENV
                );
                return ExitCode::from(EXIT_INTERNAL);
            };
            token(&socket, &args.audience)
        }
    }
}

/// Prints the token; exit 1 when agt-jail refused or could not be reached.
fn token(socket: &std::path::Path, audience: &str) -> ExitCode {
    match identity_socket::request_token(socket, audience) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("agt-jail: {err}");
            ExitCode::from(1)
        }
    }
}
