/*
 * vmstream-agent: the demo guest's in-guest agent, on the virtio-serial port
 * org.vmstream.agent (the host reaches it through the VM's agent.sock).
 *
 * Protocol: one command line in, one JSON line out. It is the same protocol
 * as the portable shell agent (vmstream-agent.sh, for real guests); this one
 * is C because a clone's identity is applied on its start-up path, and under
 * TCG every fork and exec right after a restore costs tens of milliseconds.
 * Applying an identity here is a handful of system calls; only the clone
 * hooks are run in a child, after the answer.
 *
 *   ping | status | random
 *   time               the guest's wall clock, read right before the answer
 *   clock S.N          set the wall clock to S.N
 *   clock-step D       step the wall clock by D seconds (signed): the host
 *                      measured the offset, and a step, unlike a time sent
 *                      ahead, is right however late it is applied
 *   identity B64       B64 = lines "time S.N", "seed B64", "hostname H", "ip A.B.C.D/LEN", "mac M",
 *                      "param NAME B64VALUE", "userdata B64", and
 *                      "hooks deferred": the hooks wait for start-hooks
 *   prepare B64        clock, hostname, address and MAC of an identity only: no
 *                      files, no hooks (a pooled QEMU runs its start path once)
 *   start-hooks        run the deferred hooks now
 *   hooks              results of the clone.d hooks once they ran
 *   memcheck-fill MIB SEED | memcheck-verify
 *   memcheck-dirty MIB RATE    rewrite a MIB MiB region at RATE MB/s until
 *   memcheck-dirty-stop        stopped (a migration load)
 */
#define _GNU_SOURCE /* clock_adjtime */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/timex.h>
#include <sys/wait.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <linux/random.h>

#define PORT_NAME "org.vmstream.agent"
#define STATE "/run/vmstream"
#define MEMCHECK_RESULT "/run/memcheck.json"
#define MAX_LINE (256 * 1024)

static FILE *out;

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
    fflush(out);
}

/* Monotonic microseconds: the identity answer says where its time went. */
static long long woke_us;
static long long mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* Times are printed and parsed with integer code only: under TCG, libc's
 * floating-point printf and strtod (multi-precision arithmetic) are hundreds of
 * translation blocks on a clone's start-up path. */
static const char *seconds_text(const struct timespec *ts, int decimals) {
    static char buf[4][48];
    static int next;
    char *b = buf[next++ % 4];
    long frac = ts->tv_nsec;
    for (int i = decimals; i < 9; i++) frac /= 10;
    snprintf(b, sizeof buf[0], "%lld.%0*ld", (long long)ts->tv_sec, decimals, frac);
    return b;
}

static const char *now_realtime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return seconds_text(&ts, 6);
}

/* Whole file into a static buffer (JSON files written by our own tools). */
static const char *slurp(const char *path) {
    static char buf[131072];
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    return buf;
}

static int b16val(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int b64val(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decode base64 in place-safe fashion into dst; returns length or -1. */
static long b64decode(const char *src, unsigned char *dst, size_t cap) {
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (; *src && *src != '='; src++) {
        int v = b64val((unsigned char)*src);
        if (v < 0) return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n >= cap) return -1;
            dst[n++] = (unsigned char)(acc >> bits);
        }
    }
    return (long)n;
}

/* "SECONDS[.FRACTION]" since the epoch. */
static int set_clock(const char *text) {
    char *end;
    struct timespec ts = {.tv_sec = (time_t)strtoll(text, &end, 10), .tv_nsec = 0};
    if (end == text || ts.tv_sec <= 0) return -1;
    if (*end == '.') {
        long scale = 100000000;
        for (const char *p = end + 1; *p >= '0' && *p <= '9' && scale > 0; p++, scale /= 10)
            ts.tv_nsec += (*p - '0') * scale;
    }
    return clock_settime(CLOCK_REALTIME, &ts);
}

/* "[+-]SECONDS[.FRACTION]": step the clock by that much. ADJ_SETOFFSET adds it
 * in the kernel, so no time passes between reading the clock and setting it. */
static int step_clock(const char *text) {
    int negative = *text == '-';
    if (*text == '-' || *text == '+') text++;
    char *end;
    long long ns = strtoll(text, &end, 10) * 1000000000LL;
    if (end == text && *end != '.') return -1;
    if (*end == '.') {
        long scale = 100000000;
        for (const char *p = end + 1; *p >= '0' && *p <= '9' && scale > 0; p++, scale /= 10) ns += (*p - '0') * scale;
    }
    if (negative) ns = -ns;
    struct timex tx = {.modes = ADJ_SETOFFSET | ADJ_NANO};
    tx.time.tv_sec = (time_t)(ns / 1000000000LL);
    tx.time.tv_usec = (long)(ns % 1000000000LL); /* nanoseconds with ADJ_NANO, in [0, 1e9) */
    if (tx.time.tv_usec < 0) {
        tx.time.tv_sec -= 1;
        tx.time.tv_usec += 1000000000L;
    }
    if (clock_adjtime(CLOCK_REALTIME, &tx) >= 0) return 0;
    struct timespec now; /* a kernel without ADJ_SETOFFSET: read, add, set */
    clock_gettime(CLOCK_REALTIME, &now);
    long long t = now.tv_sec * 1000000000LL + now.tv_nsec + ns;
    now.tv_sec = (time_t)(t / 1000000000LL);
    now.tv_nsec = (long)(t % 1000000000LL);
    return clock_settime(CLOCK_REALTIME, &now);
}

/* The VM's NIC: eth0 in the demo guest; a real guest's udev may have renamed it
 * (ens2, enp0s2): then the first Ethernet interface. Found at start, so a clone
 * (whose memory holds it) does not walk /sys on its identity path. */
static char ifname[IFNAMSIZ] = "eth0";

static void find_iface(void) {
    if (access("/sys/class/net/eth0", F_OK) == 0) return;
    DIR *d = opendir("/sys/class/net");
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "lo") == 0) continue;
        char type_file[300], type[16] = "";
        snprintf(type_file, sizeof type_file, "/sys/class/net/%s/type", e->d_name);
        FILE *f = fopen(type_file, "r");
        if (!f) continue;
        if (fgets(type, sizeof type, f) && atoi(type) == ARPHRD_ETHER) {
            snprintf(ifname, sizeof ifname, "%.15s", e->d_name);
            fclose(f);
            break;
        }
        fclose(f);
    }
    if (d) closedir(d);
}

static int eth0_ioctl(unsigned long request, struct ifreq *ifr) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) return -1;
    memcpy(ifr->ifr_name, ifname, IFNAMSIZ);
    int rc = ioctl(s, request, ifr);
    if (rc != 0 && errno == ENODEV) { /* renamed since the agent started */
        find_iface();
        memcpy(ifr->ifr_name, ifname, IFNAMSIZ);
        rc = ioctl(s, request, ifr);
    }
    close(s);
    return rc;
}

/* A MAC eth0 already has is left alone: setting it anyway costs the driver's
 * control-queue round trip and the stack's address-change work. */
static int set_mac(const char *text) {
    struct ifreq ifr = {0}, now = {0};
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    for (int i = 0; i < 6; i++) { /* "xx:xx:xx:xx:xx:xx" */
        int hi = b16val(text[3 * i]), lo = b16val(text[3 * i + 1]);
        if (hi < 0 || lo < 0 || text[3 * i + 2] != (i < 5 ? ':' : '\0')) return -1;
        ifr.ifr_hwaddr.sa_data[i] = (char)(hi << 4 | lo);
    }
    if (eth0_ioctl(SIOCGIFHWADDR, &now) == 0 && memcmp(now.ifr_hwaddr.sa_data, ifr.ifr_hwaddr.sa_data, 6) == 0)
        return 0;
    return eth0_ioctl(SIOCSIFHWADDR, &ifr);
}

/* The host's random bytes, credited to the kernel's pool, then a reseed of the
 * kernel's generator: clones resume one image's generator state, and a guest
 * kernel without the vmgenid driver (Debian's cloud kernel has none) would
 * otherwise give every clone the same "random" bytes until its next timed
 * reseed. Credited, so a generator not yet initialised in the image is
 * initialised from them. */
static int reseed(const char *b64) {
    struct {
        struct rand_pool_info info;
        unsigned char buf[64];
    } req;
    long n = b64decode(b64, req.buf, sizeof req.buf);
    if (n < 16) return -1;
    req.info.entropy_count = (int)n * 8;
    req.info.buf_size = (int)n;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &req.info);
    /* a kernel before 4.17 has no RNDRESEEDCRNG: the credit still reseeds it in time */
    if (rc == 0 && ioctl(fd, RNDRESEEDCRNG) != 0 && errno != EINVAL) rc = -1;
    close(fd);
    memset(&req, 0, sizeof req);
    return rc;
}

/* eth0's address and netmask (a bridged clone's own, instead of its image's). */
static int set_ip(const char *text) {
    char addr[64];
    int plen = 24;
    if (sscanf(text, "%63[^/]/%d", addr, &plen) < 1 || plen < 0 || plen > 32) return -1;
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) return -1;
    if (eth0_ioctl(SIOCSIFADDR, &ifr) != 0) return -1;
    sin->sin_addr.s_addr = plen ? htonl(0xffffffffu << (32 - plen)) : 0;
    return eth0_ioctl(SIOCSIFNETMASK, &ifr);
}

/* eth0's MAC through the same ioctl path that set it (no sysfs file walk). */
static void ioctl_mac(char *mac, size_t n) {
    struct ifreq ifr = {0};
    mac[0] = '\0';
    if (eth0_ioctl(SIOCGIFHWADDR, &ifr) == 0) {
        const unsigned char *m = (const unsigned char *)ifr.ifr_hwaddr.sa_data;
        snprintf(mac, n, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
    }
}

/* A clone's new MAC is announced at once (gratuitous ARP): otherwise slirp, or the
 * hosts on a bridge, keep sending to the image's MAC, and a connection opened
 * across the change waits for retransmissions (seconds, in Debian clones started
 * together). Set at start, so the identity path writes no file. */
static void announce_mac_changes(void) {
    int fd = open("/proc/sys/net/ipv4/conf/all/arp_notify", O_WRONLY);
    if (fd < 0) return;
    if (write(fd, "1\n", 2) != 2) { /* not fatal: the MAC still changes */ }
    close(fd);
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64 of n bytes into dst (room for 4 * ((n + 2) / 3) + 1). */
static void b64encode(const unsigned char *src, size_t n, char *dst) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)src[i] << 16 | (i + 1 < n ? (unsigned)src[i + 1] << 8 : 0) | (i + 2 < n ? src[i + 2] : 0);
        dst[o++] = B64[v >> 18 & 63];
        dst[o++] = B64[v >> 12 & 63];
        dst[o++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        dst[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    dst[o] = '\0';
}

#define HOOK_OUTPUT_MAX 65536
#define HOOKS_DIR "/etc/vmstream/clone.d"

/* One hook: its output (stdout and stderr, at most HOOK_OUTPUT_MAX bytes kept, trailing
   newlines dropped as a shell's $(...) does) and its exit status (128 + signal if killed). */
static int run_hook(const char *path, unsigned char *output, size_t *len) {
    int fds[2];
    *len = 0;
    if (pipe(fds) != 0) return 127;
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[0]);
        close(fds[1]);
        execl(path, path, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    unsigned char scratch[4096];
    for (;;) {
        size_t room = HOOK_OUTPUT_MAX - *len;
        ssize_t got = read(fds[0], room ? output + *len : scratch, room ? room : sizeof scratch);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        if (room) *len += (size_t)got;
    }
    close(fds[0]);
    while (*len && output[*len - 1] == '\n') (*len)--;
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) return 127;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int hook_file(const struct dirent *e) { return e->d_name[0] != '.'; }

/* The clone hooks, run here rather than by a shell: under TCG, every program started
   right after a restore costs ~0.1 s of host CPU (its code is translated anew), and a
   shell runner started a dozen (date, base64, head, tr, basename, mv...). Each hook
   gets the clone's parameters and VMSTREAM_* in its environment (from params.list:
   NAME BASE64VALUE lines); the results go to hooks.json, written whole. */
static void run_hooks(void) {
    static char line[MAX_LINE];
    static unsigned char value[MAX_LINE], output[HOOK_OUTPUT_MAX];
    static char encoded[HOOK_OUTPUT_MAX / 3 * 4 + 8], json[MAX_LINE];
    FILE *params = fopen(STATE "/params.list", "r");
    while (params && fgets(line, sizeof line, params)) {
        line[strcspn(line, "\n")] = '\0';
        char *b64 = strchr(line, ' ');
        if (!b64) continue;
        *b64++ = '\0';
        long n = b64decode(b64, value, sizeof value - 1);
        if (n < 0) continue;
        value[n] = '\0';
        setenv(line, (char *)value, 1);
    }
    if (params) fclose(params);
    const char *dir = getenv("VMSTREAM_HOOKS_DIR") ? getenv("VMSTREAM_HOOKS_DIR") : HOOKS_DIR;
    const char *started = now_realtime();
    size_t used = 0;
    struct dirent **names = NULL;
    int count = scandir(dir, &names, hook_file, alphasort);
    for (int i = 0; i < count; i++) {
        char path[600];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0) {
            size_t len;
            int rc = run_hook(path, output, &len);
            b64encode(output, len, encoded);
            if (used + strlen(encoded) + strlen(names[i]->d_name) + 64 < sizeof json)
                used += (size_t)snprintf(json + used, sizeof json - used, "%s{\"hook\":\"%s\",\"rc\":%d,\"output_b64\":\"%s\"}",
                                         used ? "," : "", names[i]->d_name, rc, encoded);
        }
        free(names[i]);
    }
    free(names);
    FILE *f = fopen(STATE "/hooks.json.tmp", "w");
    if (!f) return;
    fprintf(f, "{\"state\":\"done\",\"started\":%s,\"finished\":%s,\"hooks\":[%s]}\n", started, now_realtime(), json);
    fclose(f);
    rename(STATE "/hooks.json.tmp", STATE "/hooks.json");
}

/* In a child at the lowest priority: the hooks must not delay the clone's first answers. */
static void start_hooks(void) {
    unlink(STATE "/hooks.deferred");
    pid_t pid = fork();
    if (pid != 0) return;
    setsid();
    setpriority(PRIO_PROCESS, 0, 19);
    struct sigaction dfl = {.sa_handler = SIG_DFL}; /* the agent's SA_NOCLDWAIT would keep hooks' statuses away */
    sigaction(SIGCHLD, &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* nor should hooks inherit the agent's blocked SIGIO */
    run_hooks();
    _exit(0);
}

/* Where the guest parameters and user data go for the hooks (after the answer). */
static void write_hook_inputs(char **keys, char **vals, int n, int deferred) {
    static char encoded[MAX_LINE / 3 * 4 + 8];
    mkdir(STATE, 0755);
    unlink(STATE "/hooks.json");
    if (deferred) close(open(STATE "/hooks.deferred", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    FILE *env = fopen(STATE "/params.list.tmp", "w");
    if (!env) return; /* the hooks then run without parameters; hooks.json says what they saw */
    for (int i = 0; i < n; i++) {
        const char *key = keys[i];
        char *val = vals[i];
        if (strcmp(key, "hostname") == 0) {
            b64encode((unsigned char *)val, strlen(val), encoded);
            fprintf(env, "VMSTREAM_HOSTNAME %s\n", encoded);
            if (access("/etc/hostname", F_OK) == 0) { /* a real guest: its name outlives a reboot */
                FILE *h = fopen("/etc/hostname", "w");
                if (h) {
                    fprintf(h, "%s\n", val);
                    fclose(h);
                }
            }
        } else if (strcmp(key, "mac") == 0) {
            b64encode((unsigned char *)val, strlen(val), encoded);
            fprintf(env, "VMSTREAM_MAC %s\n", encoded);
        } else if (strcmp(key, "param") == 0) {
            fprintf(env, "%s\n", val); /* NAME BASE64VALUE, as the host sent it */
        } else if (strcmp(key, "userdata") == 0) {
            static unsigned char data[MAX_LINE];
            long len = b64decode(val, data, sizeof data);
            FILE *f = fopen(STATE "/user-data", "w");
            if (f && len >= 0) fwrite(data, 1, (size_t)len, f);
            if (f) fclose(f);
            b64encode((const unsigned char *)STATE "/user-data", strlen(STATE "/user-data"), encoded);
            fprintf(env, "VMSTREAM_USER_DATA %s\n", encoded);
        }
    }
    fclose(env);
    rename(STATE "/params.list.tmp", STATE "/params.list");
}

/* Clock, hostname and MAC are a few system calls and are answered at once; the
 * files for the hooks are written after the answer. Under TCG every code path a
 * restored guest runs for the first time is translated anew, and the file
 * system calls cost ~50 ms of that. The host's next command is read only after
 * this returns, so it never sees the files half-written. */
static void cmd_identity(const char *arg, int prepare) {
    static unsigned char payload[MAX_LINE];
    static char *keys[MAX_LINE / 8], *vals[MAX_LINE / 8];
    long long t_start = mono_us();
    long n = b64decode(arg, payload, sizeof payload - 1);
    if (n < 0) {
        reply("{\"ok\":false,\"error\":\"identity payload is not base64\"}");
        return;
    }
    payload[n] = '\0';
    int count = 0, deferred = 0;
    const char *error = NULL;
    long long us_clock = 0, us_mac = 0, t_step;
    for (char *line = strtok((char *)payload, "\n"); line && count < (int)(sizeof keys / sizeof *keys);
         line = strtok(NULL, "\n")) {
        char *val = strchr(line, ' ');
        if (!val) continue;
        *val++ = '\0';
        keys[count] = line;
        vals[count++] = val;
        t_step = mono_us();
        if (strcmp(line, "time") == 0) {
            if (set_clock(val) != 0) error = "clock_settime failed";
            us_clock = mono_us() - t_step;
        } else if (strcmp(line, "seed") == 0) {
            if (reseed(val) != 0) error = "reseeding the kernel's random number generator failed";
            memset(val, 0, strlen(val)); /* the seed is no longer needed in this memory */
        } else if (strcmp(line, "hostname") == 0) {
            if (sethostname(val, strlen(val)) != 0) error = "sethostname failed";
        } else if (strcmp(line, "mac") == 0) {
            if (set_mac(val) != 0) error = "setting the MAC address failed";
            us_mac = mono_us() - t_step;
        } else if (strcmp(line, "ip") == 0) {
            if (set_ip(val) != 0) error = "setting the IP address failed";
        } else if (strcmp(line, "hooks") == 0) {
            deferred = strcmp(val, "deferred") == 0;
        }
    }
    struct utsname u;
    uname(&u);
    char mac[32];
    ioctl_mac(mac, sizeof mac);
    if (error)
        reply("{\"ok\":false,\"error\":\"%s\"}", error);
    else
        reply("{\"ok\":true,\"hostname\":\"%s\",\"mac\":\"%s\",\"time\":%s,\"us\":{\"woke\":%lld,\"applied\":%lld},"
              "\"steps_us\":{\"clock\":%lld,\"mac\":%lld}}",
              u.nodename, mac, now_realtime(), woke_us ? t_start - woke_us : -1, mono_us() - t_start, us_clock, us_mac);
    if (prepare) return; /* a pooled QEMU: its clone's identity comes later, with the hooks' inputs */
    write_hook_inputs(keys, vals, count, deferred);
    if (!deferred) start_hooks();
}

static pid_t memcheck_pid;

static int memcheck_field(const char *key) {
    const char *json = slurp(MEMCHECK_RESULT);
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = json ? strstr(json, pat) : NULL;
    return p ? atoi(p + strlen(pat)) : -1;
}

static int wait_result(int (*done)(int), int arg) {
    for (int i = 0; i < 1200; i++) { /* up to 120 s */
        if (done(arg)) return 1;
        usleep(100000);
    }
    return 0;
}

static int filled(int unused) {
    (void)unused;
    const char *json = slurp(MEMCHECK_RESULT);
    return json && strstr(json, "\"state\":\"filled\"");
}

static int verified_after(int before) { return memcheck_field("verifications") > before; }

static void cmd_memcheck_fill(const char *args) {
    char mib[32] = "16", seed[32] = "1";
    sscanf(args ? args : "", "%31s %31s", mib, seed);
    if (memcheck_pid > 0) kill(memcheck_pid, SIGTERM);
    unlink(MEMCHECK_RESULT);
    char *argv[] = {"/bin/memcheck", "daemon", mib, seed, NULL};
    memcheck_pid = fork();
    if (memcheck_pid == 0) {
        setsid();
        execv(argv[0], argv);
        _exit(127);
    }
    if (wait_result(filled, 0))
        reply("{\"ok\":true,\"result\":%s}", slurp(MEMCHECK_RESULT));
    else
        reply("{\"ok\":false,\"error\":\"memcheck did not finish filling\"}");
}

static void cmd_memcheck_verify(void) {
    if (memcheck_pid <= 0 || kill(memcheck_pid, 0) != 0) {
        reply("{\"ok\":false,\"error\":\"no memcheck running: run memcheck-fill first\"}");
        return;
    }
    int before = memcheck_field("verifications");
    kill(memcheck_pid, SIGUSR1);
    if (wait_result(verified_after, before))
        reply("{\"ok\":true,\"result\":%s}", slurp(MEMCHECK_RESULT));
    else
        reply("{\"ok\":false,\"error\":\"memcheck did not answer\"}");
}

static pid_t dirty_pid;

static void cmd_memcheck_dirty(const char *args) {
    char mib[32] = "64", rate[32] = "20";
    sscanf(args ? args : "", "%31s %31s", mib, rate);
    if (dirty_pid > 0) kill(dirty_pid, SIGTERM);
    char *argv[] = {"/bin/memcheck", "dirty", mib, rate, NULL};
    dirty_pid = fork();
    if (dirty_pid == 0) {
        setsid();
        execv(argv[0], argv);
        _exit(127);
    }
    reply("{\"ok\":true,\"pid\":%d,\"mib\":%s,\"rate_mb_s\":%s}", (int)dirty_pid, mib, rate);
}

static void cmd_memcheck_dirty_stop(void) {
    int was = dirty_pid > 0 && kill(dirty_pid, SIGTERM) == 0;
    dirty_pid = 0;
    const char *json = slurp("/run/memdirty.json");
    reply("{\"ok\":true,\"stopped\":%s,\"result\":%s}", was ? "true" : "false", json ? json : "null");
}

/* Swap on a zram disk of MIB MiB (compressed in the guest's own RAM): a guest the host
   holds to a memory limit then pages out what it cannot keep instead of being OOM-killed.
   The swap header is written here (busybox's mkswap would need a fork the agent avoids). */
static void cmd_swap(const char *arg) {
    long mib = arg ? strtol(arg, NULL, 10) : 0;
    if (mib < 1) {
        reply("{\"ok\":false,\"error\":\"swap needs a size in MiB, e.g. swap 256\"}");
        return;
    }
    FILE *f = fopen("/sys/block/zram0/disksize", "w");
    if (!f) {
        reply("{\"ok\":false,\"error\":\"no zram device in this guest (its kernel has no zram module)\"}");
        return;
    }
    fprintf(f, "%ld", mib << 20);
    if (fclose(f) != 0) {
        reply("{\"ok\":false,\"error\":\"zram0 is in use already (swap is on): %s\"}", strerror(errno));
        return;
    }
    unsigned char header[4096];
    memset(header, 0, sizeof header);
    uint32_t words[3] = {1u, (uint32_t)((mib << 20) / 4096 - 1), 0u}; /* version, last page, bad pages */
    memcpy(header + 1024, words, sizeof words);
    memcpy(header + sizeof header - 10, "SWAPSPACE2", 10);
    int fd = open("/dev/zram0", O_WRONLY);
    int wrote = fd >= 0 && pwrite(fd, header, sizeof header, 0) == (ssize_t)sizeof header;
    if (fd >= 0) close(fd);
    if (!wrote || swapon("/dev/zram0", 0) != 0) {
        reply("{\"ok\":false,\"error\":\"swapon /dev/zram0 failed: %s\"}", strerror(errno));
        return;
    }
    reply("{\"ok\":true,\"swap_mib\":%ld}", mib);
}

/* memload: the memory workload the host drives (memload.c); one at a time. */
static pid_t memload_pid;
#define MEMLOAD_RESULT "/run/memload.json"

static void cmd_memload(char *args) {
    char *argv[64];
    int n = 0;
    argv[n++] = "/bin/memload";
    for (char *tok = strtok(args ? args : "", " "); tok && n < 63; tok = strtok(NULL, " ")) argv[n++] = tok;
    argv[n] = NULL;
    if (n == 1) {
        reply("{\"ok\":false,\"error\":\"memload needs phases: MIB:SECONDS ...\"}");
        return;
    }
    if (memload_pid > 0) kill(memload_pid, SIGTERM);
    unlink(MEMLOAD_RESULT);
    memload_pid = fork();
    if (memload_pid == 0) {
        setsid();
        execv(argv[0], argv);
        _exit(127);
    }
    reply("{\"ok\":true,\"pid\":%d,\"phases\":%d}", (int)memload_pid, n - 1);
}

/* Its last report, and whether it still runs (the guest's OOM killer may have ended it). */
static void cmd_memload_status(int stop) {
    int alive = memload_pid > 0 && kill(memload_pid, 0) == 0;
    if (stop && alive) kill(memload_pid, SIGTERM);
    if (stop) memload_pid = 0;
    const char *json = slurp(MEMLOAD_RESULT);
    reply("{\"ok\":true,\"running\":%s,\"result\":%s}", alive ? "true" : "false", json && *json ? json : "null");
}

/* Whether a TCP socket listens on port (IPv4 or IPv6): the host's readiness check
   tcp:PORT asks this, since on slirp a connection to the forward proves nothing. */
static int port_listening(long port) {
    static const char *const tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    char want[8];
    snprintf(want, sizeof want, ":%04lX", port);
    for (int t = 0; t < 2; t++) {
        FILE *f = fopen(tables[t], "r");
        if (!f) continue;
        char row[512], local[80], remote[80], state[8];
        while (fgets(row, sizeof row, f)) {
            if (sscanf(row, "%*s %79s %79s %7s", local, remote, state) != 3 || strcmp(state, "0A") != 0) continue;
            char *colon = strrchr(local, ':');
            if (colon && strcmp(colon, want) == 0) {
                fclose(f);
                return 1;
            }
        }
        fclose(f);
    }
    return 0;
}

static void handle(char *line) {
    line[strcspn(line, "\r\n")] = '\0';
    char *arg = strchr(line, ' ');
    if (arg) *arg++ = '\0';
    if (line[0] == '\0') return;
    if (strcmp(line, "ping") == 0) {
        reply("{\"ok\":true}");
    } else if (strcmp(line, "time") == 0) { /* lean: the host times the round trip around it */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        reply("{\"ok\":true,\"time\":%s}", seconds_text(&ts, 9));
    } else if (strcmp(line, "status") == 0) {
        struct utsname u;
        uname(&u);
        char mac[32];
        ioctl_mac(mac, sizeof mac);
        struct timespec up;
        clock_gettime(CLOCK_BOOTTIME, &up);
        reply("{\"ok\":true,\"hostname\":\"%s\",\"mac\":\"%s\",\"time\":%s,\"uptime\":%s}", u.nodename, mac,
              now_realtime(), seconds_text(&up, 2));
    } else if (strcmp(line, "clock") == 0) {
        if (set_clock(arg ? arg : "") == 0)
            reply("{\"ok\":true,\"time\":%s}", now_realtime());
        else
            reply("{\"ok\":false,\"error\":\"clock_settime failed\"}");
    } else if (strcmp(line, "clock-step") == 0) {
        if (step_clock(arg ? arg : "") == 0)
            reply("{\"ok\":true,\"time\":%s}", now_realtime());
        else
            reply("{\"ok\":false,\"error\":\"clock-step needs [+-]SECONDS, or the step failed\"}");
    } else if (strcmp(line, "random") == 0) {
        unsigned char r[16];
        int fd = open("/dev/urandom", O_RDONLY);
        ssize_t got = read(fd, r, sizeof r);
        close(fd);
        char hex[33];
        for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", got == 16 ? r[i] : 0);
        reply("{\"ok\":true,\"random\":\"%s\"}", hex);
    } else if (strcmp(line, "identity") == 0) {
        cmd_identity(arg ? arg : "", 0);
    } else if (strcmp(line, "prepare") == 0) {
        cmd_identity(arg ? arg : "", 1);
    } else if (strcmp(line, "start-hooks") == 0) {
        int pending = access(STATE "/hooks.deferred", F_OK) == 0;
        if (pending) start_hooks();
        reply("{\"ok\":true,\"started\":%s}", pending ? "true" : "false");
    } else if (strcmp(line, "hooks") == 0) {
        const char *json = slurp(STATE "/hooks.json");
        if (json)
            reply("{\"ok\":true,\"result\":%s}", json);
        else if (access(STATE "/hooks.deferred", F_OK) == 0)
            reply("{\"ok\":true,\"result\":{\"state\":\"pending\"}}");
        else if (access(STATE "/params.list", F_OK) == 0)
            reply("{\"ok\":true,\"result\":{\"state\":\"running\"}}");
        else
            reply("{\"ok\":true,\"result\":{\"state\":\"none\"}}");
    } else if (strcmp(line, "listening") == 0) {
        long port = arg ? strtol(arg, NULL, 10) : 0;
        if (port < 1 || port > 65535)
            reply("{\"ok\":false,\"error\":\"listening needs a TCP port\"}");
        else
            reply("{\"ok\":true,\"listening\":%s}", port_listening(port) ? "true" : "false");
    } else if (strcmp(line, "memcheck-fill") == 0) {
        cmd_memcheck_fill(arg);
    } else if (strcmp(line, "memcheck-verify") == 0) {
        cmd_memcheck_verify();
    } else if (strcmp(line, "memcheck-dirty") == 0) {
        cmd_memcheck_dirty(arg);
    } else if (strcmp(line, "memcheck-dirty-stop") == 0) {
        cmd_memcheck_dirty_stop();
    } else if (strcmp(line, "swap") == 0) {
        cmd_swap(arg);
    } else if (strcmp(line, "memload") == 0) {
        cmd_memload(arg);
    } else if (strcmp(line, "memload-status") == 0) {
        cmd_memload_status(0);
    } else if (strcmp(line, "memload-stop") == 0) {
        cmd_memload_status(1);
    } else {
        reply("{\"ok\":false,\"error\":\"unknown command: %s\"}", line);
    }
}

/* The virtio-serial port named org.vmstream.agent, as /dev/vportNpM. */
static int find_port(char *path, size_t n) {
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    int found = 0;
    while (d && !found && (e = readdir(d)) != NULL) {
        char name_file[300], name[128] = "";
        snprintf(name_file, sizeof name_file, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(name_file, "r");
        if (!f) continue;
        if (fgets(name, sizeof name, f)) name[strcspn(name, "\n")] = '\0';
        fclose(f);
        if (strcmp(name, PORT_NAME) == 0) {
            snprintf(path, n, "/dev/%s", e->d_name);
            found = 1;
        }
    }
    if (d) closedir(d);
    return found;
}

int main(void) {
    static char line[MAX_LINE];
    find_iface();
    announce_mac_changes();
    struct sigaction sa = {.sa_handler = SIG_DFL, .sa_flags = SA_NOCLDWAIT};
    sigaction(SIGCHLD, &sa, NULL); /* children (hooks, memcheck) are reaped by the kernel */
    /* SIGIO comes when the host connects or sends data; it is taken with
       sigtimedwait, so it stays blocked and never interrupts anything. */
    sigset_t io;
    sigemptyset(&io);
    sigaddset(&io, SIGIO);
    sigprocmask(SIG_BLOCK, &io, NULL);
    char path[300];
    for (;;) {
        int fd = find_port(path, sizeof path) ? open(path, O_RDWR) : -1;
        if (fd < 0) {
            sleep(1);
            continue;
        }
        fcntl(fd, F_SETOWN, getpid());
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC);
        out = fdopen(dup(fd), "w");
        static char outbuf[MAX_LINE];
        if (out) setvbuf(out, outbuf, _IOFBF, sizeof outbuf); /* no malloc or tty check at the first answer */
        size_t len = 0;
        for (;;) {
            ssize_t got = read(fd, line + len, sizeof line - 1 - len);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) break;
            if (got == 0) {
                /* no host on the other end: a read returns at once, so wait for SIGIO */
                struct timespec limit = {.tv_sec = 5};
                sigtimedwait(&io, NULL, &limit);
                woke_us = mono_us();
                continue;
            }
            len += (size_t)got;
            line[len] = '\0';
            char *nl;
            while ((nl = strchr(line, '\n')) != NULL) {
                *nl = '\0';
                handle(line);
                size_t used = (size_t)(nl + 1 - line);
                memmove(line, nl + 1, len - used + 1);
                len -= used;
            }
            if (len >= sizeof line - 1) len = 0; /* an overlong line is dropped */
        }
        fclose(out);
        close(fd);
        sleep(1);
    }
}
