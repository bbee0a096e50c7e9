//! Building blocks of secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al.
//! 2017): secret sharing of the mask secrets ([`shamir`]) and fixed-point quantisation of
//! clipped updates into Z_(2³²) ([`quantize`]). The protocol that uses them (key agreement,
//! pairwise and self masks, the coordinator's unmasking) is issue 11's next part.

pub mod quantize;
pub mod shamir;
