//! `veil sev owner`: the guest owner's side of one launch, wired to files (the work is in
//! `veil::sev_owner`).

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use veil::sev_chain::read_chain_file;
use veil::sev_launch::MeasurementFile;
use veil::sev_owner::{ExpectedImage, Owner};
use veil_hypervisor::BootConfig;
use veil_sev::policy::GuestPolicy;

use crate::cli::OwnerArgs;

pub fn run(args: OwnerArgs) -> Result<(), Box<dyn Error>> {
    let chain = read_chain_file(&args.chain)?;
    let mut trusted_arks = veil_sev::emulated::identity::amd_arks()?;
    if let Some(path) = &args.trust_chain {
        trusted_arks.push(read_chain_file(path)?.ca.ark);
    }
    let secret = args
        .secret
        .as_deref()
        .map(hex::decode)
        .transpose()
        .map_err(|e| format!("--secret is not hex: {e}"))?;
    // Everything the check needs is prepared before the host is given the session.
    let image = ExpectedImage::load(
        &BootConfig {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
        },
        args.memory,
    )?;
    let owner = Owner::new(GuestPolicy(args.policy), chain, &trusted_arks)?;
    write_atomically(&args.cert_out, &owner.certificate()?)?;
    write_atomically(&args.session_out, &owner.session_blob())?;
    eprintln!(
        "veil: owner session in {}, certificate in {}; waiting for {}",
        args.session_out.display(),
        args.cert_out.display(),
        args.measurement.display()
    );
    let deadline = Instant::now() + args.timeout;
    while !args.measurement.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "no measurement appeared in {} within {}",
                args.measurement.display(),
                humantime::format_duration(args.timeout)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let measurement: MeasurementFile = serde_json::from_slice(
        &std::fs::read(&args.measurement)
            .map_err(|e| format!("cannot read {}: {e}", args.measurement.display()))?,
    )
    .map_err(|e| {
        format!(
            "{} is not a measurement file: {e}",
            args.measurement.display()
        )
    })?;
    let verified = owner.verify(&measurement, &image)?;
    println!(
        "measurement verified: {} (API {}.{} build {}, policy {:#x}, {} ranges{})",
        measurement.measurement,
        measurement.api_major,
        measurement.api_minor,
        measurement.build,
        measurement.policy,
        measurement.measured.len(),
        if measurement.confidential {
            ""
        } else {
            "; emulated platform, no confidentiality"
        }
    );
    if let (Some(secret), Some(out)) = (secret, &args.secret_out) {
        let file = verified.secret(args.secret_gpa, &secret)?;
        write_atomically(out, &serde_json::to_vec(&file)?)?;
        println!(
            "secret of {} bytes for {:#x} written to {}",
            secret.len(),
            args.secret_gpa,
            out.display()
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), Box<dyn Error>> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}
