//! Which burn device to compute on, chosen at run time: `flex` (pure Rust, always built),
//! `libtorch` (CPU) and `cuda:N` (GPU), the latter two only in binaries built with `--features tch`.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// How to get libtorch support, for error messages.
pub const BUILD_WITH_TCH: &str = "rebuild with libtorch support: `deploy/install-libtorch.sh`, export the LIBTORCH line it prints, then `cargo build --release --features fedtune-client/tch,fedtune-coordinator/tch` (see README, \"GPU and libtorch\")";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use flex, libtorch or cuda:N (e.g. cuda:0)")]
    Unknown(String),
    #[error("device `{0}` needs libtorch, but this binary was built without it; {BUILD_WITH_TCH}")]
    NotBuilt(String),
    #[error(
        "device `{device}` was asked for but CUDA is not available to libtorch ({reason}); check `nvidia-smi`, or use --device libtorch or flex"
    )]
    CudaUnavailable { device: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Flex,
    LibTorch,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" => Ok(Self::Flex),
            "libtorch" | "libtorch-cpu" => Ok(Self::LibTorch),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => write!(f, "flex"),
            Self::LibTorch => write!(f, "libtorch"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceChoice {
    /// The burn device (without autodiff). Checks that the backend is built in and, for CUDA,
    /// that a GPU is really there (burn would panic instead of returning an error).
    pub fn device(&self) -> Result<Device, DeviceError> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            // burn-tch is deprecated upstream in 0.22 but works; it is our GPU path.
            Self::LibTorch => Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            Self::Cuda(i) => {
                let count = tch::Cuda::device_count();
                if !tch::Cuda::is_available() || (*i as i64) >= count {
                    let reason = if count == 0 {
                        "no CUDA device found".to_string()
                    } else {
                        format!("{count} device(s), index {i} out of range")
                    };
                    return Err(DeviceError::CudaUnavailable {
                        device: self.to_string(),
                        reason,
                    });
                }
                Ok(Device::libtorch_cuda(*i))
            }
            #[cfg(not(feature = "tch"))]
            Self::LibTorch | Self::Cuda(_) => Err(DeviceError::NotBuilt(self.to_string())),
        }
    }
}

/// What this binary can compute on, for `fedtune-client devices`.
pub fn describe() -> String {
    #[cfg(feature = "tch")]
    {
        let count = tch::Cuda::device_count();
        let cuda = if tch::Cuda::is_available() && count > 0 {
            format!("available, {count} device(s): cuda:0..cuda:{}", count - 1)
        } else {
            "not available (no NVIDIA driver or GPU visible to libtorch)".to_string()
        };
        format!("flex: available\nlibtorch: available\ncuda: {cuda}")
    }
    #[cfg(not(feature = "tch"))]
    {
        format!("flex: available\nlibtorch: not built in ({BUILD_WITH_TCH})\ncuda: not built in")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("flex".parse(), Ok(DeviceChoice::Flex));
        assert!(matches!(
            "tpu".parse::<DeviceChoice>(),
            Err(DeviceError::Unknown(_))
        ));
        #[cfg(not(feature = "tch"))]
        {
            let e = DeviceChoice::LibTorch.device().unwrap_err().to_string();
            assert!(e.contains("--features"), "{e}");
        }
    }
}
