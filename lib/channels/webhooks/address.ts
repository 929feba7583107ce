import type { LookupAddress } from 'node:dns'
import { lookup as dnsLookup } from 'node:dns/promises'
import { BlockList, isIP } from 'node:net'

/**
 * Addresses a per-upload endpoint may not reach: loopback, private, link-local (cloud metadata
 * at 169.254.169.254 included), shared, multicast and reserved ranges of both families.
 */
const BLOCKED = new BlockList()
for (const [net, bits] of [
  ['0.0.0.0', 8], ['10.0.0.0', 8], ['100.64.0.0', 10], ['127.0.0.0', 8], ['169.254.0.0', 16],
  ['172.16.0.0', 12], ['192.0.0.0', 24], ['192.0.2.0', 24], ['192.168.0.0', 16], ['198.18.0.0', 15],
  ['198.51.100.0', 24], ['203.0.113.0', 24], ['224.0.0.0', 4], ['240.0.0.0', 4]
] as const) BLOCKED.addSubnet(net, bits, 'ipv4')
for (const [net, bits] of [
  ['::', 128], ['::1', 128], ['fc00::', 7], ['fe80::', 10], ['fec0::', 10], ['ff00::', 8], ['2001:db8::', 32], ['100::', 64]
] as const) BLOCKED.addSubnet(net, bits, 'ipv6')

/** The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible or NAT64 IPv6 address. */
export function embeddedIPv4 (address: string): string | null {
  const lower = address.toLowerCase()
  const m = /^(?:::ffff:(?:0+:)?|::|64:ff9b::)(.+)$/.exec(lower)
  if (m === null) return null
  const rest = m[1]
  if (isIP(rest) === 4) return rest
  const hex = /^([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(rest)
  if (hex === null) return null
  const hi = parseInt(hex[1], 16)
  const lo = parseInt(hex[2], 16)
  return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`
}

/** The eight 16-bit groups of an IPv6 address (`::` expanded, a trailing dotted quad read). */
function ipv6Groups (address: string): number[] | null {
  let text = address.toLowerCase().split('%')[0]
  const quad = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(text)
  if (quad !== null) {
    if (isIP(quad[2]) !== 4) return null
    const b = quad[2].split('.').map(Number)
    text = `${quad[1]}${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}`
  }
  const halves = text.split('::')
  if (halves.length > 2) return null
  const part = (s: string): number[] => s === '' ? [] : s.split(':').map(g => parseInt(g, 16))
  const head = part(halves[0])
  const tail = halves.length === 2 ? part(halves[1]) : []
  const fill = 8 - head.length - tail.length
  if (halves.length === 1 ? fill !== 0 : fill < 0) return null
  const groups = [...head, ...new Array<number>(Math.max(fill, 0)).fill(0), ...tail]
  return groups.every(g => Number.isInteger(g) && g >= 0 && g <= 0xffff) ? groups : null
}

const quad = (hi: number, lo: number): string => `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`

/**
 * The IPv4 addresses a transition address leads to: 6to4 (`2002:AABB:CCDD::/48` reaches
 * A.B.C.D through a relay) and Teredo (`2001:0:<server>:<flags>:<port>:<client, inverted>`).
 * Each must pass the IPv4 rule, or `2002:7f00:1::` would reach 127.0.0.1.
 */
export function tunnelledIPv4 (address: string): string[] {
  const g = ipv6Groups(address)
  if (g === null) return []
  if (g[0] === 0x2002) return [quad(g[1], g[2])]
  if (g[0] === 0x2001 && g[1] === 0) return [quad(g[2], g[3]), quad(g[6] ^ 0xffff, g[7] ^ 0xffff)]
  return []
}

/** Whether a per-upload endpoint may connect to this address. */
export function isPublicAddress (address: string): boolean {
  const family = isIP(address)
  if (family === 0) return false
  if (family === 6) {
    const v4 = embeddedIPv4(address)
    if (v4 !== null) return isPublicAddress(v4)
    if (!tunnelledIPv4(address).every(isPublicAddress)) return false
    return !BLOCKED.check(address, 'ipv6')
  }
  return !BLOCKED.check(address, 'ipv4')
}

export type Lookup = (hostname: string) => Promise<LookupAddress[]>

export const defaultLookup: Lookup = async (hostname) => await dnsLookup(hostname, { all: true, verbatim: true })

/** Why an endpoint is refused: says what to change. */
export class RefusedEndpoint extends Error {}

/**
 * Resolves the endpoint's host once and returns the addresses to connect to, so the check and the
 * connection see the same addresses (a name that changes between the two cannot get through).
 * Refused when any address of the name is not public, unless private addresses are allowed.
 */
export async function resolveEndpoint (url: URL, lookup: Lookup, allowPrivate: boolean): Promise<LookupAddress[]> {
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname
  let addresses: LookupAddress[]
  if (isIP(host) !== 0) {
    addresses = [{ address: host, family: isIP(host) }]
  } else {
    try {
      addresses = await lookup(host)
    } catch (err) {
      throw new RefusedEndpoint(`cannot resolve ${host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    }
  }
  if (addresses.length === 0) throw new RefusedEndpoint(`cannot resolve ${host}: no address`)
  if (!allowPrivate) {
    const blocked = addresses.find(a => !isPublicAddress(a.address))
    if (blocked !== undefined) throw new RefusedEndpoint(`${host} resolves to ${blocked.address}, a loopback, private, link-local or reserved address`)
  }
  return addresses
}

/** A host pattern: `example.com`, `*.example.com` (subdomains only), `*`; an optional `:port`. */
export function hostAllowed (url: URL, patterns: string[]): boolean {
  const host = url.hostname.toLowerCase()
  const port = url.port === '' ? (url.protocol === 'https:' ? '443' : '80') : url.port
  return patterns.some(raw => {
    const pattern = raw.toLowerCase()
    const colon = pattern.lastIndexOf(':')
    const hasPort = colon > 0 && !pattern.endsWith(']') && /^\d+$/.test(pattern.slice(colon + 1))
    const name = hasPort ? pattern.slice(0, colon) : pattern
    if (hasPort && pattern.slice(colon + 1) !== port) return false
    if (name === '*') return true
    if (name.startsWith('*.')) return host.endsWith(name.slice(1)) && host.length > name.length - 1
    return host === name
  })
}

/**
 * Checks a per-upload endpoint against a kind's rules, before any name resolution: a URL, https
 * (http only when allowed), no credentials in it, a host the allow-list names.
 */
export function checkEndpointUrl (value: string, allow: string[], allowHttp: boolean): URL {
  let url: URL
  try {
    url = new URL(value)
  } catch {
    throw new RefusedEndpoint('it is not an absolute URL')
  }
  if (url.protocol !== 'https:' && !(allowHttp && url.protocol === 'http:')) throw new RefusedEndpoint(`the scheme must be https${allowHttp ? ' or http' : ''}`)
  if (url.username !== '' || url.password !== '') throw new RefusedEndpoint('it must not carry credentials')
  if (!hostAllowed(url, allow)) throw new RefusedEndpoint(`${url.host} is not in the allowed hosts`)
  return url
}
