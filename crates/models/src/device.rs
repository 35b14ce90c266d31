//! `lorag.device`: auto | cpu | cuda:N. This build has no CUDA support compiled in (no CUDA
//! toolkit here), so `auto` resolves to the CPU and `cuda:N` is an error that says so.

use crate::ModelError;
use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<DeviceChoice, ModelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(DeviceChoice::Cuda(n)),
                None => Err(ModelError::Invalid(format!("invalid device \"{s}\": use auto, cpu or cuda:N"))),
            },
        }
    }

    /// The device that really runs, and its name for `worker_status()`.
    pub fn resolve(self) -> Result<(Device, String), ModelError> {
        match self {
            DeviceChoice::Cpu => Ok((Device::Cpu, "cpu".into())),
            DeviceChoice::Auto => match Device::cuda_if_available(0) {
                Ok(d) if d.is_cuda() => Ok((d, "cuda:0".into())),
                _ => Ok((Device::Cpu, "cpu".into())),
            },
            DeviceChoice::Cuda(n) => match Device::new_cuda(n) {
                Ok(d) => Ok((d, format!("cuda:{n}"))),
                Err(e) => Err(ModelError::Invalid(format!("device cuda:{n} is not available: {e}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(DeviceChoice::parse("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(DeviceChoice::parse("CPU").unwrap(), DeviceChoice::Cpu);
        assert_eq!(DeviceChoice::parse("cuda:1").unwrap(), DeviceChoice::Cuda(1));
        assert!(DeviceChoice::parse("tpu").is_err());
        assert_eq!(DeviceChoice::Auto.resolve().unwrap().1, "cpu");
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap().1, "cpu");
    }
}
