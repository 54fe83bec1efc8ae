//! Crash windows. With the `failpoints` feature, `FAILPOINTS=name=return` (see the `fail`
//! crate for counts such as `3*off->return`) kills the process with SIGKILL at that line,
//! exactly like `kill -9` from outside.

/// Marks a crash window.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::failpoints::die($name))
    };
}
pub(crate) use crash_point;

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) fn die(name: &str) -> ! {
    tracing::error!(
        failpoint = name,
        "fail point reached: killing this process with SIGKILL"
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

/// A pause at a fail point, without blocking the runtime's thread: `name=return(MS)` in
/// `FAILPOINTS` makes this return `Some(MS milliseconds)`; the caller sleeps on its own.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub(crate) fn pause(name: &str) -> Option<std::time::Duration> {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |arg| {
            arg.and_then(|ms| ms.parse().ok())
                .map(std::time::Duration::from_millis)
        })
        .flatten()
    }
    #[cfg(not(feature = "failpoints"))]
    None
}
